"""The extraction loop: inputs -> parallel decoding -> batched detection -> selection -> shards."""
from __future__ import annotations

import errno
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.names import safe_name
from common.shard_format import RECIPE_FILE, npy_bytes
from common.shard_writer import ShardWriter, close_inherited_lock
from extractor.detector import BottomUpDetector
from extractor.gt_boxes import GroundTruthBoxes
from extractor.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, pixel_tensor
from extractor.preview import draw_preview, load_class_names
from extractor.roi_heads import RegionOutputs
from extractor.select import RegionSelector, background_first
from extractor.sources import InputRecord, img2dataset_fields


@dataclass
class ExtractionSettings:
    batch_size: int = 4
    workers: int = 0
    preview: int = 0
    class_names: Optional[str] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    throttle_s: float = 0.0  # testing aid: sleep per batch so a kill can land mid-run
    progress: bool = True


class DecodingDataset(Dataset):
    """Map-style, so DataLoader workers decode in parallel while batches keep input order."""

    def __init__(self, records: List[InputRecord], max_pixels: int):
        self.records, self.max_pixels = records, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict:
        record = self.records[index]
        item = {"index": index, "pixels": None, "reason": None, "mode": None, "frames": 1}
        try:
            decoded = decode_image(record.read_bytes(), self.max_pixels)
            item.update(pixels=pixel_tensor(decoded.pixels), mode=decoded.original_mode, frames=decoded.frames)
        except ImageRejected as error:
            item["reason"] = str(error)
        except OSError as error:
            item["reason"] = _unreadable(record.path, error)
        return item


def _unreadable(path: str, error: OSError) -> str:
    """Why an input file could not be read; a link to nothing says where it points."""
    if os.path.islink(path) and not os.path.exists(path):
        if error.errno == errno.ELOOP:
            return f"a symbolic link loop (to {os.readlink(path)})"
        return f"a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
    return f"cannot read file: {error}"


def encode_sample(record: InputRecord, width: int, height: int, boxes: np.ndarray,
                  features: np.ndarray, cls_prob: np.ndarray, attr_prob: Optional[np.ndarray],
                  header: Dict) -> Dict[str, bytes]:
    """Shard members of one sample, exactly as docs/shard-format.md describes."""
    info = dict(image_id=record.key, width=width, height=height, num_boxes=int(len(boxes)),
                source=record.source, **header)
    info.update(img2dataset_fields(record.meta))
    members = {"json": json.dumps(info).encode("utf-8")}
    if record.caption:
        members["txt"] = record.caption.encode("utf-8")
    members["features.npy"] = npy_bytes(features.astype(np.float16))
    members["boxes.npy"] = npy_bytes(boxes.astype(np.float32))
    members["cls_prob.npy"] = npy_bytes(cls_prob.astype(np.float16))
    if attr_prob is not None:
        members["attr_prob.npy"] = npy_bytes(attr_prob.astype(np.float16))
    return members


def select_regions(output: RegionOutputs, scale: float, width: int, height: int,
                   selector: Optional[RegionSelector]):
    """-> boxes (N, 4) original pixels, features (N, D), cls_prob (N, C+1) bg first, attr or None."""
    cls_prob = background_first(output.cls_probs)
    attr = None if output.attr_probs is None else background_first(output.attr_probs)
    boxes = output.boxes / scale  # original-image pixels, where Caffe selects (its +1 rule is not scale-free)
    if selector is None:  # --gt-boxes: keep every given box, in the given order
        index = torch.arange(len(boxes), device=boxes.device)
    else:
        index = selector(boxes, cls_prob[:, 1:]).indices
    rows = [boxes[index], output.features[index], cls_prob[index]] + \
        ([] if attr is None else [attr[index]])
    host = torch.cat([r.float() for r in rows], dim=1).cpu().split([r.shape[1] for r in rows], dim=1)  # one copy
    boxes = host[0]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return (boxes.numpy(), host[1].numpy(), host[2].numpy(), None if attr is None else host[3].numpy())


def _plan(records: List[InputRecord], writer: ShardWriter):
    """-> (records to extract, skipped count, failed count, previously failed count); duplicates are
    logged. Skipped: already in OUT's shards, or failed in an earlier run (in errors.jsonl, not retried:
    the previously failed ones, counted also on their own)."""
    seen, todo, skipped, failed, previously_failed = set(), [], 0, 0, 0
    sources = _done_sources(writer.out_dir, {r.key for r in records if r.shared and r.key in writer.done_keys})
    for record in records:
        if record.key in sources and _file_name(sources[record.key]) != _file_name(record.source):
            writer.log_error(record.key, record.source, f"OUT holds the key {record.key!r} with the features of "
                             f"{sources[record.key]}, from a run before this image shared its key; extract this "
                             "folder into a new OUT")
            failed += 1
        elif record.key in writer.done_keys:
            skipped += 1
        elif record.source in writer.error_sources:
            skipped += 1
            previously_failed += 1
        elif record.key in seen:
            writer.log_error(record.key, record.source, f"duplicate image key {record.key!r}")
            failed += 1
        else:
            seen.add(record.key)
            todo.append(record)
    return todo, skipped, failed, previously_failed


def _done_sources(out_dir: Path, keys: set) -> Dict[str, str]:
    """The `source` each done sample of `keys` records in its JSON, read from OUT's complete shards
    (only for keys that names share, so rarely read at all)."""
    found: Dict[str, str] = {}
    for shard in sorted(Path(out_dir).glob("*.tar")) if keys else []:
        try:
            with tarfile.open(shard, "r:") as archive:
                for member in archive:
                    key, _, suffix = member.name.partition(".")
                    if suffix == "json" and key in keys and member.isfile():
                        info = json.loads(archive.extractfile(member).read())
                        if isinstance(info, dict) and isinstance(info.get("source"), str):
                            found.setdefault(key, info["source"])
        except (tarfile.TarError, OSError, ValueError):
            continue  # the writer's resume scan reports a damaged shard
    return found


def _file_name(source: str) -> str:
    """The file name of a source ('photos/a b.jpg', 'shard.tar:a b.jpg#2' -> 'a b.jpg')."""
    return os.path.basename(source.rsplit(":", 1)[-1].split("#", 1)[0])


def _given_boxes(gt_boxes: GroundTruthBoxes, record: InputRecord, pixels: np.ndarray):
    """Ground-truth boxes clipped to the image (K, 4); or why there are none (a string)."""
    rejected = gt_boxes.rejection(record)
    if rejected:
        return rejected
    boxes = gt_boxes.lookup(record)
    if boxes is None or not len(boxes):
        return "no ground-truth boxes for this image"
    height, width = pixels.shape[:2]
    mismatch = gt_boxes.size_mismatch(record, width, height)
    if mismatch:
        return mismatch
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():  # a feature of nothing would look like a region
        return (f"ground-truth box {boxes[empty][0].tolist()} lies outside the {width}x{height} image "
                f"({int(empty.sum())} of {len(boxes)} boxes)")
    return clipped


def _detect(detector: BottomUpDetector, pixels: List[np.ndarray], given):
    """Run a batch; if it fails (e.g. out of memory on one huge image), retry image by image so
    one bad input cannot stop the run. -> [(output, scale) or error string]"""
    try:
        outputs, scales = detector(pixels, given)
        return list(zip(outputs, scales))
    except RuntimeError as error:
        if len(pixels) == 1:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return [f"detector failed: {str(error).splitlines()[0][:300]}"]
    results = []
    for index, image in enumerate(pixels):
        results.extend(_detect(detector, [image], None if given is None else [given[index]]))
    return results


def precision_name(detector: BottomUpDetector) -> str:
    """The autocast dtype the network runs in (--precision), as the recipe records it."""
    dtype = getattr(detector, "autocast_dtype", None)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


class _WorkerInit:
    """A decoding worker forked from the extraction lets go of OUT's lock (ShardWriter.lock_identity):
    otherwise an orphaned worker of a killed run keeps it for seconds and the re-run is refused."""

    def __init__(self, writer: ShardWriter):
        self.lock = writer.lock_identity()  # (fd, device, inode), picklable for any start method

    def __call__(self, worker_id: int) -> None:
        close_inherited_lock(self.lock)


class RecipeMismatch(ValueError):
    """OUT already holds shards made with another detector, weights or selection settings."""


LATER_FIELDS = ("gt_boxes_sha256",)  # recorded in recipe.json since 2026-12-01


def check_recipe(out_dir: Path, header: Dict) -> None:
    """Record the feature recipe in OUT/recipe.json on the first run; refuse to resume into OUT
    with a different one (shards of mixed recipes would silently poison training)."""
    path = Path(out_dir) / RECIPE_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
        if isinstance(previous, dict):  # a field an earlier version did not record is not compared
            header = {k: v for k, v in header.items() if k in previous or k not in LATER_FIELDS}
        if previous is not None and previous != header:
            changed = sorted(k for k in set(previous) | set(header) if previous.get(k) != header.get(k))
            raise RecipeMismatch(
                f"{path}: this output folder was made with a different feature recipe "
                f"({', '.join(f'{k}: {previous.get(k)!r} -> {header.get(k)!r}' for k in changed)}); "
                "use a new output folder")
        if previous is not None:
            return
    temporary = path.with_name(f".{RECIPE_FILE}.{os.getpid()}")
    temporary.write_text(json.dumps(header, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def run_extraction(detector: BottomUpDetector, records: List[InputRecord], writer: ShardWriter,
                   selector: RegionSelector, settings: ExtractionSettings,
                   gt_boxes: Optional[GroundTruthBoxes] = None) -> Dict:
    """Extract every record not already done (nor logged as failed by an earlier run); returns the
    summary counts (`skipped` includes `previously_failed`, the records errors.jsonl lists)."""
    if gt_boxes is not None and gt_boxes.name_of is None:
        gt_boxes.bind(records)  # the CLI binds before anything is written; a library caller here
    recipe = detector.config.recipe
    if selector is not None and (selector.box_offset, selector.threshold_order) != \
            (recipe.box_offset, recipe.threshold_order):
        raise ValueError(f"the region selector's conventions differ from the detector's recipe {recipe.name!r}: "
                         "build it with RegionSelector.for_recipe(detector.config.recipe, ...)")
    todo, skipped, failed, previously_failed = _plan(records, writer)
    header = dict(detector=detector.config.name, weights_hash=detector.weights_hash,
                  recipe=detector.config.recipe_name, mode="gt-boxes" if gt_boxes else "detected",
                  attributes=detector.config.use_attributes, precision=precision_name(detector),
                  backend=getattr(detector, "backend_name", "torch"))
    if detector.weights_hash == "random-init":
        header["seed"] = detector.random_seed
    if gt_boxes is not None:
        header["gt_boxes_sha256"] = gt_boxes.digest()
    if gt_boxes is None:
        header.update(min_boxes=selector.min_boxes, max_boxes=selector.max_boxes,
                      conf_threshold=selector.conf_threshold,
                      proposals=detector.config.rpn_post_nms_topk)
    check_recipe(writer.out_dir, header)
    names = load_class_names(settings.class_names, detector.config.num_classes) \
        if settings.preview else []
    loader = DataLoader(DecodingDataset(todo, settings.max_pixels), batch_size=settings.batch_size,
                        worker_init_fn=_WorkerInit(writer),
                        num_workers=settings.workers, collate_fn=list)
    done, previews, started = 0, 0, time.time()
    bar = tqdm(total=len(todo), unit="img", disable=not settings.progress, desc="extract")
    for batch in loader:
        good = []  # (item, record, given boxes or None)
        for item in batch:
            record = todo[item["index"]]
            boxes = None
            if item["pixels"] is not None and gt_boxes is not None:
                boxes = _given_boxes(gt_boxes, record, item["pixels"])
                if isinstance(boxes, str):
                    item["reason"], item["pixels"] = boxes, None
            if item["pixels"] is None:
                writer.log_error(record.key, record.source, item["reason"])
                failed += 1
            else:
                good.append((item, record, boxes))
        given = [g[2] for g in good] if gt_boxes is not None else None
        results = _detect(detector, [g[0]["pixels"] for g in good], given) if good else []
        for (item, record, _), result in zip(good, results):
            if isinstance(result, str):
                writer.log_error(record.key, record.source, result)
                failed += 1
                continue
            height, width = item["pixels"].shape[:2]
            boxes, features, cls_prob, attr = select_regions(
                result[0], result[1], width, height, None if gt_boxes is not None else selector)
            if len(boxes) == 0:
                writer.log_error(record.key, record.source, "the detector proposed no regions")
                failed += 1
                continue
            if not (np.isfinite(features).all() and np.isfinite(cls_prob).all()
                    and (attr is None or np.isfinite(attr).all())):
                writer.log_error(record.key, record.source, "the detector gave non-finite (NaN or inf) features or "
                                 "class scores: broken weights, or an fp16 overflow (try --precision bf16 or fp32)")
                failed += 1
                continue
            writer.write(record.key, encode_sample(record, width, height, boxes, features,
                                                   cls_prob, attr, header))
            done += 1
            if previews < settings.preview:
                draw_preview(item["pixels"].numpy(), boxes, cls_prob, names,
                             Path(writer.out_dir) / "preview" / f"{safe_name(record.key, 100)}.png")
                previews += 1
        bar.update(len(batch))
        if settings.throttle_s:
            time.sleep(settings.throttle_s)
    bar.close()
    writer.close()
    elapsed = time.time() - started
    return dict(done=done, skipped=skipped, failed=failed, previously_failed=previously_failed,
                shards_written=writer.shards_written,
                seconds=round(elapsed, 3),
                images_per_second=round(done / elapsed, 3) if elapsed else 0.0)
