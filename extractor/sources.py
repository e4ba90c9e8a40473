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
from common.safe_load import regular_file
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
    shared: bool = False  # its name shares its safe key with another's (unique_keys): it keeps the plain key

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
                else:
                    record.shared = True  # OUT may hold its key from a run before the others came
    return records


def read_caption_tsv(path: str, notes: Optional[List[str]] = None) -> Dict[str, str]:
    """`caption<TAB>url-or-filename` lines -> {name: caption}, the name being a URL's file name or a
    file's path as written (relative to IMAGES, or absolute); a header line is skipped, and so is a
    UTF-8 byte-order mark (spreadsheets write one). ValueError for a FIFO or another file that is not
    a regular file, and for a line that is not UTF-8 (naming it: replacement characters would pass
    into the captions). A name given two different captions keeps the last (shards hold one caption
    an image); `notes` gets one line saying how many, with an example."""
    captions: Dict[str, str] = {}
    repeated: Dict[str, int] = {}
    with open(regular_file(path, "a captions TSV"), "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not UTF-8 ({error.reason} at byte {error.start}); "
                                 "convert the file, e.g. iconv -f latin1 -t utf-8") from None
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 2:
                continue
            caption, target = parts[0].strip(), parts[1].strip()
            if line_number == 1 and target.lower() in ("url", "filename", "file", "image"):
                continue
            if "://" in target:  # a URL's query is not part of its file name; a local 'what?.jpg' keeps its '?'
                name = os.path.basename(target.split("?")[0])
            else:
                name = Path(os.path.normpath(target)).as_posix()
            if captions.get(name, caption) != caption:
                repeated.setdefault(name, line_number)
            captions[name] = caption
    if repeated and notes is not None:
        name, line_number = next(iter(repeated.items()))
        notes.append(f"{path}: {len(repeated)} image(s) are given more than one caption, e.g. {name!r} again at "
                     f"line {line_number}; a shard holds one caption an image: each keeps its last")
    return captions


def _relative_names(captions: Dict[str, str], root: Path) -> Dict[str, str]:
    """The captions with absolute names under `root` as paths relative to it (how images are looked up)."""
    base = os.path.realpath(root)
    out = {}
    for name, caption in captions.items():
        if os.path.isabs(name) and (os.path.realpath(name) + os.sep).startswith(base + os.sep):
            name = Path(os.path.relpath(os.path.realpath(name), base)).as_posix()
        out[name] = caption
    return out


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
    """`path`, its links resolved, is `folder` (a resolved path) or lies inside it; a link loop never raises."""
    if folder is None:
        return False
    real = Path(os.path.realpath(path))
    return real == folder or folder in real.parents


def _walk_files(root: Path, exclude: Optional[Path]) -> List[Path]:
    """Every file name under `root`, sorted, following links to folders (`images/coco -> /data/coco`)
    but entering each real folder once (a link to a folder above it is no loop); the folder `exclude`
    is not entered. Dangling links are listed: the caller reports them."""
    found, visited = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited or _is_under(Path(folder), exclude):
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders.sort()
        found.extend(Path(folder) / name for name in files)
    return sorted(found)


def _folder_records(root: Path, captions: Dict[str, str], exclude: Optional[Path],
                    captions_source: str = "--captions", files: Optional[List[Path]] = None) -> List[InputRecord]:
    """The image files under `root` (`files`: its `_walk_files`), captioned from the TSV or a sidecar
    KEY.txt. A dangling link with an image's name is kept: reading it fails and logs it."""
    records = []
    files = _walk_files(root, exclude) if files is None else files
    paths = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or _is_dangling(p))
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


def _is_dangling(path: Path) -> bool:
    """A symbolic link whose target does not exist (or a link loop)."""
    return path.is_symlink() and not path.exists()


def _split_member_name(name: str) -> Tuple[str, str]:
    """'sub/IMG_2020.01.00.jpg' -> ('sub/IMG_2020.01.00', '.jpg'): the extension is the last one, as
    for the files of a folder. img2dataset's members (KEY.jpg, KEY.txt, KEY.json) have keys without
    dots, so they split the same way at the first dot or the last. A leading './' (`tar cf x.tar -C
    dir .`) is not part of the name: './000000042.jpg' keeps the key 000000042."""
    while name.startswith("./"):
        name = name[2:]
    directory, base = os.path.split(name)
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem:  # no extension ('README', '.jpg')
        return os.path.join(directory, base), ""
    return os.path.join(directory, stem), "." + extension.lower()


@dataclass
class _TarSample:
    """The members of one sample of a shard: an image, its caption, its JSON (each once)."""
    stem: str
    image: Optional[tarfile.TarInfo] = None
    caption: Optional[str] = None
    meta: Optional[Dict] = None
    occurrence: int = 1  # 2, 3, ...: a later sample of the same key (a shard appended to with tar -rf)


def _slot(extension: str) -> Optional[str]:
    """Which part of a sample a member of this extension is, or None for a member that is no part."""
    if extension in IMAGE_EXTENSIONS:
        return "image"
    return {".txt": "caption", ".json": "meta"}.get(extension)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, slot: str):
    """The caption (str) or JSON (dict) of a member; {} for a JSON that is not an object."""
    data = archive.extractfile(member).read()
    if slot == "caption":
        return data.decode("utf-8", "replace").strip()
    try:
        meta = json.loads(data)
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}  # img2dataset writes an object


def _tar_samples(archive: tarfile.TarFile, samples: List[_TarSample]) -> None:
    """Group the members of `archive` into `samples` (appended as read, so that a damaged shard keeps
    those before the damage): a member joins the latest sample of its key unless that one already has
    a member of its kind; then it starts the next sample of that key. So a shard with a key twice
    (`3.jpg 3.txt 3.jpg 3.txt`, after `tar -rf`) gives two samples, each picture with its own caption."""
    latest: Dict[str, _TarSample] = {}
    for member in archive:
        if not member.isfile():
            continue
        stem, extension = _split_member_name(member.name)
        slot = _slot(extension)
        if slot is None:
            continue
        sample = latest.get(stem)
        if sample is None or getattr(sample, slot) is not None:
            sample = _TarSample(stem, occurrence=sample.occurrence + 1 if sample else 1)
            latest[stem] = sample
            samples.append(sample)
        setattr(sample, slot, member if slot == "image" else _read_member(archive, member, slot))


def _caption_of(sample: _TarSample) -> Optional[str]:
    """A tar sample's caption: its KEY.txt, else the `caption` of its img2dataset KEY.json."""
    if sample.caption is not None:
        return sample.caption
    caption = (sample.meta or {}).get("caption")
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


def _tar_records(tar_path: Path, problems: Optional[List[Tuple[str, str]]] = None,
                 folder: str = "") -> List[InputRecord]:
    """The images of an img2dataset shard. A shard that is corrupt or truncated keeps the images
    read before the damage; the damage goes to `problems` as (path, reason), or raises ValueError
    when no list is given. `folder`: the shard's folder under IMAGES, the first part of its keys
    (two img2dataset runs in one input folder both number their keys from 000000000). A key the
    shard holds twice gives two records of one key (the later is logged as a duplicate); the later's
    `source` names its occurrence ('shard.tar:3.jpg#2'), so that its error is not the first one's."""
    samples: List[_TarSample] = []
    try:
        with tarfile.open(tar_path, "r:") as archive:
            _tar_samples(archive, samples)
    except (tarfile.TarError, OSError, EOFError) as error:
        reason = (f"not a readable tar shard ({type(error).__name__}: {error}); "
                  f"the {sum(s.image is not None for s in samples)} image(s) listed before the damage are still tried")
        if problems is None:
            raise ValueError(f"{tar_path}: {reason}") from None
        problems.append((str(tar_path), reason))
    return [InputRecord(key=safe_key(os.path.join(folder, s.stem)), path=str(tar_path),
                        source=f"{tar_path}:{s.image.name}" + (f"#{s.occurrence}" if s.occurrence > 1 else ""),
                        offset=s.image.offset_data, size=s.image.size, caption=_caption_of(s), meta=s.meta or {},
                        name=os.path.join(folder, s.stem))
            for s in sorted((s for s in samples if s.image is not None), key=lambda s: s.image.offset)]


def discover_inputs(images: str, captions_tsv: Optional[str] = None, exclude: Optional[str] = None,
                    problems: Optional[List[Tuple[str, str]]] = None,
                    notes: Optional[List[str]] = None) -> List[InputRecord]:
    """All inputs under `images` (a folder, or one .tar), in a deterministic order; files under
    `exclude` (the output folder, when it sits inside the input folder) are ignored, and links to
    folders are followed. Unreadable tar shards go to `problems` as (path, reason) with their readable
    images kept (without a list: ValueError); what the captions TSV says of itself goes to `notes`."""
    excluded = Path(exclude).resolve() if exclude else None
    root = Path(images)
    if not root.exists():
        raise FileNotFoundError(f"{images}: no such file or directory")
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"{images}: expected a folder of images or an img2dataset .tar shard")
        return unique_keys(_tar_records(root, problems))
    captions = _relative_names(read_caption_tsv(captions_tsv, notes), root) if captions_tsv else {}
    files = _walk_files(root, excluded)
    records = _folder_records(root, captions, excluded, captions_tsv or "--captions", files)
    for tar_path in (p for p in files if p.suffix == ".tar" and p.is_file() and not _is_under(p, excluded)):  # no FIFOs
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
