"""`vilbert-extract IMAGES OUT`: region features for a folder of images or img2dataset shards."""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import click
import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rank_and_world(rank, num_workers):
    """--rank/--num-workers win; otherwise torchrun's RANK/WORLD_SIZE; otherwise 0 of 1."""
    try:
        if rank is None:
            rank = int(os.environ.get("RANK", 0))
        if num_workers is None:
            num_workers = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise click.BadParameter(f"$RANK={os.environ.get('RANK')!r} / $WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                                 "expected integers (or pass --rank / --num-workers)") from None
    if not 0 <= rank < num_workers:
        raise click.BadParameter(f"rank {rank} must be in 0..{num_workers - 1}")
    return rank, num_workers


def _check_prefix(prefix: str) -> str:
    """A shard prefix is one plain file-name part: never a path, never hidden from the readers."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", prefix or ""):
        raise click.BadParameter(f"{prefix!r}: letters, digits, '_' and '-' only, not starting with '-' "
                                 "(it names the shard files inside OUT)")
    if len(prefix) > 100:
        raise click.BadParameter(f"{len(prefix)} characters: at most 100 (it names the shard files inside OUT)")
    return prefix


def _refuse_images_inside_out(images, out) -> None:
    """IMAGES that is OUT or lies inside it: the extractor never reads its own output folder as input
    (it would find its shards and previews), so it would find nothing; say so, not "no images found"."""
    images_path, out_path = Path(images).resolve(), Path(out).resolve()
    if images_path == out_path or out_path in images_path.parents:
        where = "is the output folder OUT" if images_path == out_path else f"is inside the output folder OUT {out}"
        raise click.ClickException(f"IMAGES {images} {where}, whose files are never read as input; "
                                   "write the features to a folder outside IMAGES")


# (the captions TSV and the ground-truth boxes are checked so by their readers, read_caption_tsv and
# GroundTruthBoxes.from_file, which vilbert-import and library callers share)
INPUT_FILES = (("weights", "detector weights (.pkl, .bin, .pth or .pt)"),
               ("class_names", "a text file of class names"))


def _check_input_files(**paths) -> None:
    """Each input file given (`INPUT_FILES`' options) is a regular file, before anything opens it: a FIFO
    would block the run forever. ValueError "PATH: not a regular file (a FIFO): expected WHAT"."""
    from common.safe_load import regular_file

    for option, what in INPUT_FILES:
        if paths.get(option):
            regular_file(paths[option], what)


def _warn_about_rejected_boxes(boxes) -> None:
    """COCO annotations of no area (or not finite): say once, before the run, that their images are skipped."""
    if boxes is not None and boxes.rejected_by_name:
        example = next(iter(boxes.rejected_by_name.values()))
        click.echo(f"warning: {len(boxes.rejected_by_name)} image(s) have a 'bbox' that is no box and are not "
                   f"extracted (each is a line in errors.jsonl), e.g. {example}", err=True)


def _refuse_when_nothing_extracted(records, inputs, problems, writer, out) -> None:
    """A run none of whose images is in OUT's shards (all failed, now or in the run it resumes) fails
    with a line saying so, after the summary line; a run where only some failed does not."""
    if any(record.key in writer.done_keys for record in records):
        return
    log = os.path.join(out, "errors.jsonl")
    if records:
        raise click.ClickException(f"{out}: no image was extracted: all {len(records)} failed (see {log})")
    if problems and not inputs:
        raise click.ClickException(f"{out}: no image was extracted: all {len(problems)} input shards are "
                                   f"unreadable (see {log})")


def _warn_about_captions_of_done_images(records, writer, out) -> None:
    """A re-run skips the images already in OUT's shards, and shards are not rewritten: captions given
    now for images extracted without one are not added. Say so, with the count and the way out."""
    missing = [r.key for r in records if r.caption and r.key in writer.done_keys and r.key not in writer.captioned_keys]
    if missing:
        click.echo(f"warning: {len(missing)} image(s) already in {out} were extracted without a caption and keep "
                   f"none (the shards are not rewritten), e.g. {missing[0]!r}; to train on their captions, extract "
                   "them into a new OUT", err=True)


def _warn_about_captions(records, captions_tsv) -> None:
    """Training needs captions: say so before hours of extraction produce shards it would skip."""
    missing = sum(1 for record in records if not record.caption)
    if missing:
        where = f" (none matched in {captions_tsv})" if captions_tsv and missing == len(records) else ""
        click.echo(f"warning: {missing} of {len(records)} images have no caption{where}: they are extracted, "
                   "but pretraining skips them (captions: KEY.txt beside each image, --captions FILE.tsv, or "
                   "the .txt members of img2dataset shards)", err=True)


def _warn_about_img2dataset_resizing(records) -> None:
    """img2dataset's defaults (resize_mode=border, image_size=256) pad every image into a small
    square: say so once, before the extraction, with how to download images the detector can use."""
    from extractor.sources import reshaped_by_img2dataset

    count, example, padding = reshaped_by_img2dataset(records)
    if count:
        click.echo(f"warning: {count} of {len(records)} img2dataset images were stored at another aspect ratio "
                   f"than the original (e.g. {example}; border mode pads about {100 * padding:.0f} % of such a "
                   "frame): img2dataset padded, cropped or squashed them (its default --resize_mode border, "
                   "--image_size 256). Bottom-up features need the whole image at ~600 px: the detector scales a "
                   "256-px frame up and finds regions in the padding. Re-download with --resize_mode no (or "
                   "keep_ratio with --image_size 600 or more). Boxes are in the pixels of the images as read.",
                   err=True)


def _made_progress(name: str) -> bool:
    """A name in OUT that a failed run keeps: a complete shard, a set-aside one, the error log."""
    from common.shard_format import ERRORS_FILE

    return name == ERRORS_FILE or name.endswith(".damaged") or (name.endswith(".tar") and not name.startswith("."))


@contextlib.contextmanager
def _writing(writer, out):
    """Close the ShardWriter however the run ends (its lock on OUT is released; the samples written
    so far stay); a full disk becomes one line saying the complete shards are intact."""
    from common.outputs import disk_full, is_disk_full

    try:
        yield writer
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise click.ClickException(disk_full(out, error, "the complete shards are intact")) from None
    finally:
        try:
            writer.close()
        except OSError as error:
            if not is_disk_full(error):
                raise  # (on a full disk the unfinished partial shard is removed by the next run)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("images", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Detector weights: py-bottom-up-attention .pkl or HF frcnn-vg-finetuned "
                   "pytorch_model.bin. Without it: LOUD warning + seeded random weights.")
@click.option("--config", "config_name", type=click.Choice(["r101", "tiny"]), default="r101",
              help="Detector architecture (tiny = test-sized network).")
@click.option("--attributes/--no-attributes", default=False,
              help="Build the 400-attribute head (needs the _attr weights) and store attr_prob.")
@click.option("--recipe", type=click.Choice(["caffe", "detectron2"]), default="caffe",
              help="Test-time conventions: caffe = the Caffe bottom-up-attention pipeline that made the published "
                   "features (OpenCV resize, +1-pixel boxes, its anchors and proposal filter); detectron2 = those "
                   "of py-bottom-up-attention and the HF port (docs/extractor.md has the table).")
@click.option("--backend", type=click.Choice(["torch", "detectron2"]), default="torch",
              help="detectron2 needs `pip install detectron2` (see docs/extractor.md).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, help="Images per forward pass.")
@click.option("--precision", type=click.Choice(sorted(PRECISIONS)), default="fp32",
              help="Autocast dtype for the network (box selection always runs in fp32); bf16 is ~1.8x "
                   "faster on this project's CPU (AVX-512 BF16); measure the drift first (benchmarks/).")
@click.option("--channels-last/--no-channels-last", default=True,
              help="NHWC convolutions (faster on CPU and on GPU tensor cores; the regions are the same).")
@click.option("--workers", type=click.IntRange(min=0), default=2,
              help="DataLoader processes decoding images in parallel.")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Conceptual-Captions style TSV: caption<TAB>url-or-filename. Otherwise sidecar "
                   "KEY.txt files (or the .txt inside img2dataset shards) are used.")
@click.option("--min-boxes", type=click.IntRange(min=1), default=10,
              help="At least this many regions per image (best scores, even below the threshold).")
@click.option("--max-boxes", type=click.IntRange(min=1), default=36, help="At most this many regions per image.")
@click.option("--conf-threshold", type=float, default=0.2,
              help="Keep regions whose best class score survives per-class NMS (IoU 0.3) at >= this.")
@click.option("--proposals", type=click.IntRange(min=1), default=None,
              help="RPN proposals kept after NMS, among which regions are selected "
                   "[default: 300 for r101, 60 for tiny].")
@click.option("--gt-boxes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON {name: [[x1,y1,x2,y2],...]} or COCO file: features for exactly these boxes.")
@click.option("--preview", type=click.IntRange(min=0), default=0,
              help="Write this many PNGs with boxes and class names to OUT/preview/.")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class names for --preview, one per line (e.g. VG objects_vocab.txt).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485,
              help="Reject larger images (decompression bombs) from their header.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, help="Samples per shard.")
@click.option("--prefix", default="shard", callback=lambda ctx, param, value: _check_prefix(value),
              help="Shard file prefix: PREFIX-000000.tar.")
@click.option("--num-workers", "num_workers", type=click.IntRange(min=1), default=None,
              help="Total number of extraction processes (default: $WORLD_SIZE or 1).")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="This process's index among --num-workers (default: $RANK or 0).")
@click.option("--seed", type=int, default=20240601, help="Seed of the random init (no --weights).")
@click.option("--throttle", type=float, default=0.0, hidden=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(images, out, weights, config_name, attributes, recipe, backend, device, batch_size, precision,
            channels_last, workers, captions, min_boxes, max_boxes, conf_threshold, proposals, gt_boxes, preview,
            class_names, max_pixels, shard_size, prefix, num_workers, rank, seed, throttle, quiet):
    """Extract bottom-up-attention region features from IMAGES (a folder of images, a folder of
    img2dataset .tar shards, or one .tar) into WebDataset shards in OUT (docs/shard-format.md).

    Re-running the same command resumes: images already in complete shards are skipped."""
    from common.devices import check_device
    from common.outputs import folder_entries, undo_failed_start, writable_folder
    from common.shard_writer import OutputBusy, ShardWriter
    from extractor.config import get_config
    from extractor.detector import build_detector
    from extractor.gt_boxes import GroundTruthBoxes
    from extractor.pipeline import ExtractionSettings
    from extractor.preview import load_class_names
    from extractor.sources import discover_inputs, split_for_rank
    from extractor.weights import WeightsError

    if min_boxes > max_boxes:
        raise click.BadParameter(f"--min-boxes {min_boxes} > --max-boxes {max_boxes}")
    rank, world = _rank_and_world(rank, num_workers)
    _refuse_images_inside_out(images, out)
    problems, notes = [], []  # unreadable input shards: (path, reason); what the captions TSV says of itself
    try:
        device = check_device(device)
        _check_input_files(weights=weights, class_names=class_names)
        writable_folder(out, "OUT")
        boxes = GroundTruthBoxes.from_file(gt_boxes) if gt_boxes else None
        inputs = discover_inputs(images, captions, exclude=out, problems=problems, notes=notes)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    if not inputs and not problems:
        raise click.ClickException(f"{images}: no images found (image files, or img2dataset .tar shards)")
    if boxes is not None:
        try:
            boxes.bind(inputs)  # every name to one image, or a one-line error before anything is written
        except ValueError as error:
            raise click.ClickException(str(error)) from error
    _warn_about_rejected_boxes(boxes)
    if not gt_boxes:  # task features (RefCOCO+ boxes) need no captions
        _warn_about_captions(inputs, captions)
    _warn_about_img2dataset_resizing(inputs)
    config = get_config(config_name, use_attributes=attributes, recipe=recipe)
    if proposals:
        config = config.replace(rpn_post_nms_topk=proposals)
    if class_names:  # read now, not after OUT is set up
        try:
            load_class_names(class_names, config.num_classes)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    try:
        if backend == "detectron2":
            from extractor.backend_detectron2 import build_detectron2_detector

            detector = build_detectron2_detector(config, weights, device, seed, channels_last)
        else:
            detector = build_detector(config, weights, device=device, seed=seed, channels_last=channels_last)
    except (WeightsError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    detector.autocast_dtype = PRECISIONS[precision]
    detector.backend_name = backend
    records = split_for_rank(inputs, rank, world)
    before = folder_entries(out)
    try:
        writer = ShardWriter(out, prefix=prefix, shard_size=shard_size, rank=rank, world_size=world)
    except OutputBusy as error:
        raise click.ClickException(str(error)) from None
    try:
        settings = ExtractionSettings(batch_size=batch_size, workers=workers, preview=preview,
                                      class_names=class_names, max_pixels=max_pixels, throttle_s=throttle,
                                      progress=not quiet)
        summary = _run(writer, detector, records, problems, config, rank, world, out, min_boxes, max_boxes,
                       conf_threshold, boxes, settings)
    except BaseException:
        # a run that fails before it made anything (a broken backend, a recipe refused) leaves OUT as it
        # was; not with several ranks, whose files in OUT this process cannot tell from its own
        if world == 1:
            undo_failed_start(out, before, _made_progress)
        raise
    _refuse_when_nothing_extracted(records, inputs, problems, writer, out)
    return summary


def _run(writer, detector, records, problems, config, rank, world, out, min_boxes, max_boxes, conf_threshold,
         boxes, settings):
    """The extraction into an open ShardWriter, its warnings and its summary line."""
    from extractor.pipeline import RecipeMismatch, run_extraction
    from extractor.select import RegionSelector

    for name in writer.damaged:
        click.echo(f"warning: {out}/{name}; set aside as .damaged, its images are extracted again", err=True)
    if writer.sizes_repaired:
        click.echo(f"warning: {writer.sizes_repaired}; rewritten from the complete shards", err=True)
    _warn_about_captions_of_done_images(records, writer, out)
    for path, reason in problems:
        click.echo(f"warning: {path}: {reason}", err=True)
        if rank == 0 and path not in writer.error_sources:  # once, also over resumed runs
            writer.log_error(os.path.splitext(os.path.basename(path))[0], path, reason)
    with _writing(writer, out):
        try:
            summary = run_extraction(detector, records, writer,
                                     RegionSelector.for_recipe(config.recipe, min_boxes, max_boxes, conf_threshold),
                                     settings, boxes)
        except RecipeMismatch as error:
            raise click.ClickException(str(error)) from error
    summary.update(rank=rank, num_workers=world, out=str(out), unreadable_shards=len(problems))
    failures = f"failed {summary['failed']}" + (f", unreadable input shards {len(problems)}" if problems else "")
    if summary["failed"] or problems:
        failures += f" (see {os.path.join(out, 'errors.jsonl')})"
    click.echo(f"done {summary['done']}, skipped {summary['skipped']}{_previously_failed(summary, out)}, "
               f"{failures}; {summary['images_per_second']} images/s")
    click.echo(json.dumps(summary), err=True)
    return summary


def _previously_failed(summary, out) -> str:
    """The part of the summary line on the skipped images that failed in an earlier run: they are not
    tried again until their lines leave errors.jsonl."""
    count = summary.get("previously_failed", 0)
    if not count:
        return ""
    return (f" (of which previously failed {count}, not retried: see {os.path.join(out, 'errors.jsonl')}; "
            "delete their lines to retry)")


def main(argv=None):
    """As every CLI's: with argv, returns the summary dict (a mistake raises click's exception);
    without, reads sys.argv and exits with the status."""
    return extract.main(args=None if argv is None else list(argv), prog_name="vilbert-extract",
                        standalone_mode=argv is None)
