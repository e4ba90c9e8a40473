"""Input discovery: an image folder (captions from sidecar .txt files or a Conceptual-Captions style
TSV), img2dataset tar shards (KEY.jpg / KEY.txt / KEY.json), or both. Produces a deterministic,
sorted list of records that can be split across ranks and read back from any process."""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common.names import hashed_key, image_key
from extractor.images import IMAGE_EXTENSIONS


@dataclass
class InputRecord:
    key: str  # stable image id, safe as a WebDataset key (no dots, no slashes)
    source: str  # human-readable origin: file path, or "shard.tar:member"
    path: str  # file to read (the image itself, or the tar holding it)
    offset: int = -1  # byte offset of the member inside `path` when it is a tar; -1 for plain files
    size: int = -1
    caption: Optional[str] = None
    meta: Dict = field(default_factory=dict)
    name: str = ""  # the name the key was made from (its path under IMAGES, without the extension)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as handle:
            if self.offset < 0:
                return handle.read()
            handle.seek(self.offset)
            return handle.read(self.size)


def safe_key(name: str) -> str:
    """'photos/a b.v2' -> 'photos_a_b_v2', see `common.names.image_key`."""
    return image_key(name)


def unique_keys(records: List[InputRecord]) -> List[InputRecord]:
    """Names that differ only in replaced characters ('a b', 'a_b', 'a.b') share a `safe_key`: in
    such a group every name that is not its own key gets the key plus a short hash of the name
    ('a b' -> 'a_b-…'), and the one that is (if any) keeps it. Only names that are the same without
    their extensions ('a.jpg', 'a.png') still share a key (the later is logged as a duplicate)."""
    groups: Dict[str, List[InputRecord]] = {}
    for record in records:
        groups.setdefault(record.key, []).append(record)
    for key, group in groups.items():
        if len({r.name for r in group}) > 1:
            for record in group:
                if record.name != key:
                    record.key = hashed_key(key, record.name)
    return records


def read_caption_tsv(path: str) -> Dict[str, str]:
    """`caption<TAB>url-or-filename` lines -> {name: caption}, the name being a URL's file name or a
    file's path as written (relative to IMAGES); a header line is skipped."""
    captions: Dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            caption, target = parts[0].strip(), parts[1].strip()
            if line_number == 1 and target.lower() in ("url", "filename", "file", "image"):
                continue
            if "://" in target:  # a URL's query is not part of its file name; a local 'what?.jpg' keeps its '?'
                name = os.path.basename(target.split("?")[0])
            else:
                name = Path(os.path.normpath(target)).as_posix()
            captions[name] = caption
    return captions


def caption_for(relative: Path, captions: Dict[str, str], images_by_name: Dict[str, int], source: str):
    """The TSV caption of the image at `relative` (its path under IMAGES): by that path, else by
    its file name when no other image has the same file name; ValueError if the TSV names a file
    name that several images share (a guess would give one image another's caption)."""
    caption = captions.get(relative.as_posix())
    if caption is None and relative.name in captions:
        if images_by_name.get(relative.name, 0) > 1:
            raise ValueError(f"{source}: {relative.name!r} names {images_by_name[relative.name]} images under "
                             "IMAGES (in different folders); give their paths relative to IMAGES instead")
        caption = captions[relative.name]
    return caption


def _is_under(path: Path, folder: Optional[Path]) -> bool:
    return folder is not None and (path.resolve() == folder or folder in path.resolve().parents)


def _folder_records(root: Path, captions: Dict[str, str], exclude: Optional[Path],
                    captions_source: str = "--captions") -> List[InputRecord]:
    records = []
    paths = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not _is_under(p, exclude)]
    images_by_name: Dict[str, int] = {}
    for path in paths:
        images_by_name[path.name] = images_by_name.get(path.name, 0) + 1
    for path in paths:
        relative = path.relative_to(root)
        caption = caption_for(relative, captions, images_by_name, captions_source) if captions else None
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        name = str(relative.with_suffix(""))
        records.append(InputRecord(key=safe_key(name), source=str(path), path=str(path), caption=caption, name=name))
    return records


def _split_member_name(name: str) -> Tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), "." + extension.lower()


def _tar_records(tar_path: Path, problems: Optional[List[Tuple[str, str]]] = None,
                 folder: str = "") -> List[InputRecord]:
    """The images of an img2dataset shard. A shard that is corrupt or truncated keeps the images
    read before the damage; the damage goes to `problems` as (path, reason), or raises ValueError
    when no list is given. `folder`: the shard's folder under IMAGES, the first part of its keys
    (two img2dataset runs in one input folder both number their keys from 000000000)."""
    images: Dict[str, tarfile.TarInfo] = {}
    texts: Dict[str, str] = {}
    metas: Dict[str, Dict] = {}
    order: List[str] = []
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                stem, extension = _split_member_name(member.name)
                if extension in IMAGE_EXTENSIONS and stem not in images:
                    images[stem] = member
                    order.append(stem)
                elif extension == ".txt":
                    texts[stem] = archive.extractfile(member).read().decode("utf-8", "replace").strip()
                elif extension == ".json":
                    try:
                        meta = json.loads(archive.extractfile(member).read())
                    except ValueError:
                        meta = {}
                    metas[stem] = meta if isinstance(meta, dict) else {}  # img2dataset writes an object
    except (tarfile.TarError, OSError, EOFError) as error:
        reason = (f"not a readable tar shard ({type(error).__name__}: {error}); "
                  f"the {len(order)} image(s) listed before the damage are still tried")
        if problems is None:
            raise ValueError(f"{tar_path}: {reason}") from None
        problems.append((str(tar_path), reason))
    return [InputRecord(key=safe_key(os.path.join(folder, stem)), source=f"{tar_path}:{images[stem].name}",
                        path=str(tar_path), offset=images[stem].offset_data,
                        size=images[stem].size, caption=texts.get(stem), meta=metas.get(stem, {}),
                        name=os.path.join(folder, stem))
            for stem in order]


def discover_inputs(images: str, captions_tsv: Optional[str] = None, exclude: Optional[str] = None,
                    problems: Optional[List[Tuple[str, str]]] = None) -> List[InputRecord]:
    """All inputs under `images` (a folder, or one .tar), in a deterministic order; files under
    `exclude` (the output folder, when it sits inside the input folder) are ignored. Unreadable
    tar shards go to `problems` as (path, reason) with their readable images kept (without a
    list: ValueError)."""
    excluded = Path(exclude).resolve() if exclude else None
    root = Path(images)
    if not root.exists():
        raise FileNotFoundError(f"{images}: no such file or directory")
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"{images}: expected a folder of images or an img2dataset .tar shard")
        return unique_keys(_tar_records(root, problems))
    captions = read_caption_tsv(captions_tsv) if captions_tsv else {}
    records = _folder_records(root, captions, excluded, captions_tsv or "--captions")
    for tar_path in sorted(p for p in root.rglob("*.tar") if p.is_file() and not _is_under(p, excluded)):  # no FIFOs
        folder = tar_path.parent.relative_to(root).as_posix()
        records.extend(_tar_records(tar_path, problems, "" if folder == "." else folder))
    return unique_keys(records)


IMG2DATASET_FIELDS = ("key", "url", "caption", "original_width", "original_height")


def img2dataset_fields(meta: Dict) -> Dict:
    """What a sample's JSON keeps of img2dataset's per-image JSON: its key (as `img2dataset_key`),
    url, caption and the size of the image before img2dataset resized it."""
    kept = {}
    for name in IMG2DATASET_FIELDS:
        value = meta.get(name)
        if name.startswith("original_"):  # a size: a positive integer of a real image, nothing else
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1_000_000:
                kept[name] = value
        elif isinstance(value, str):
            kept["img2dataset_key" if name == "key" else name] = value
    return kept


def reshaped_by_img2dataset(records: List[InputRecord]) -> Tuple[int, Optional[str], float]:
    """Images that img2dataset padded, cropped or squashed: stored at another aspect ratio than the
    original (its default resize_mode=border makes 256x256 frames). -> (count, an example, the mean
    share of those frames that border-mode padding fills)."""
    count, example, padding = 0, None, 0.0
    for record in records:
        meta = record.meta
        sizes = [meta.get(n) for n in ("width", "height", "original_width", "original_height")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            continue
        width, height, original_w, original_h = sizes
        if abs(width / height - original_w / original_h) <= 0.02 * (original_w / original_h):
            continue
        count += 1
        example = example or f"{record.source}: {width}x{height}, originally {original_w}x{original_h}"
        fit = min(width / original_w, height / original_h)  # border mode: the image scaled to fit, then padded
        padding += 1.0 - (original_w * fit) * (original_h * fit) / (width * height)
    return count, example, padding / count if count else 0.0


def split_for_rank(records: List[InputRecord], rank: int, world_size: int) -> List[InputRecord]:
    """Rank r of W takes records r, r+W, r+2W, ... of the deterministic order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return records[rank::world_size]
