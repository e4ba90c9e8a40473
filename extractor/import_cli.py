"""`vilbert-import SRC OUT`: region features made elsewhere into shards exactly as vilbert-extract
writes them; `vilbert-export SHARDS OUT`: shards back out to volta's HDF5 or a BUTD TSV."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from extractor.cli import _check_prefix, _made_progress, _writing

IMPORT_FORMATS = ("butd-tsv", "lxmert-tsv", "vilbert-lmdb", "npz", "h5")
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.command(context_settings=CONTEXT)
@click.argument("src", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(("auto",) + IMPORT_FORMATS), default="auto",
              help="The source's format; auto: told from SRC when only one fits.")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TSV caption<TAB>image-id-or-file-name (KEY.txt of each sample, which pretraining needs); "
                   "matched by image id, file stem, or the number a file name ends in.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, help="Samples per shard.")
@click.option("--prefix", default="shard", callback=lambda ctx, param, value: _check_prefix(value),
              help="Shard file prefix: PREFIX-000000.tar.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_features(src, out, fmt, captions, shard_size, prefix, quiet):
    """Convert region features in SRC (a file or a folder: BUTD or LXMERT TSVs, a vilbert-multi-task or
    volta LMDB, bottom-up-attention.pytorch .npz files, volta HDF5) into WebDataset shards in OUT,
    in vilbert-extract's format (docs/extractor.md lists what each format carries).

    Re-running the same command resumes: records already in complete shards are skipped."""
    from common.outputs import folder_entries, undo_failed_start, writable_folder
    from common.shard_writer import OutputBusy, ShardWriter
    from extractor.importers import FORMATS, detect_format
    from extractor.importers.driver import Captions
    from extractor.importers.loop import ImportSettings
    from extractor.sources import read_caption_tsv

    source = Path(src).resolve()  # one name for each record however SRC is spelt: errors.jsonl matches on re-runs
    try:
        writable_folder(out, "OUT")
        fmt = detect_format(source) if fmt == "auto" else fmt
        module = FORMATS[fmt]
        if not module.matches(source):
            raise ValueError(f"{src}: not in the {fmt} format ({module.__doc__.strip().splitlines()[0]})")
        total = module.count(source)
        notes = []
        index = Captions(read_caption_tsv(captions, notes)) if captions else None
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    before = folder_entries(out)
    try:
        writer = ShardWriter(out, prefix=prefix, shard_size=shard_size)
    except OutputBusy as error:
        raise click.ClickException(str(error)) from None
    settings = ImportSettings(fmt=fmt, source=str(source), captions=index, progress=not quiet, total=total,
                              id_hint=getattr(module, "ID_HINT", ""))
    try:
        summary = _run(module, source, out, writer, settings)
        _warn_when_no_caption_matched(summary, captions)
        _refuse_when_nothing_imported(summary, src, out)
        return summary
    except BaseException:  # a run that fails before it made anything leaves OUT as it found it
        undo_failed_start(out, before, _made_progress)
        raise


def _warn_when_no_caption_matched(summary, captions) -> None:
    """A --captions TSV none of whose lines names a record imported now: every sample is without KEY.txt,
    which pretraining needs. Say so (vilbert-extract does too), with how names are matched."""
    if captions and summary["done"] and not summary["captioned"]:
        click.echo(f"warning: none of the {summary['done']} records imported matched a caption in {captions}: "
                   "they are imported without one, and pretraining skips them (captions are matched by image id, "
                   "file stem, or the number a file name ends in)", err=True)


def _refuse_when_nothing_imported(summary, src, out) -> None:
    """A run none of whose records is in OUT's shards fails with a line saying why (after the summary
    line): all of them failed, now or in the run it resumes; all its files are unreadable; it has none."""
    if summary["in_shards"]:
        return
    log = os.path.join(out, "errors.jsonl")
    failed, unreadable = summary["failed"] + summary["skipped"], len(summary["unreadable_files"])
    if failed:
        raise click.ClickException(f"{out}: no record was imported: all {failed} records of {src} failed (see {log})")
    if unreadable:
        raise click.ClickException(f"{out}: no record was imported: all {unreadable} files of {src} are unreadable "
                                   f"(see {log})")
    raise click.ClickException(f"{src}: holds no records to import")


def _run(module, src, out, writer, settings):
    """The import into an open ShardWriter, its warnings and its summary line."""
    from extractor.importers.loop import run_import
    from extractor.pipeline import RecipeMismatch, check_recipe

    for name in writer.damaged:
        click.echo(f"warning: {out}/{name}; set aside as .damaged, its records are imported again", err=True)
    with _writing(writer, out):
        try:
            summary = run_import(lambda: module.entries(src), writer, settings, check_recipe)
        except (RecipeMismatch, ValueError, ImportError) as error:  # ValueError: a source the reader refuses whole
            raise click.ClickException(str(error)) from error
    summary.update(out=str(out), source=str(src))
    for line in summary["unreadable_files"]:
        click.echo(f"warning: {line}; its records are not imported", err=True)
    for note, times in summary["notes"].items():
        click.echo(f"warning: {times} records: {note}", err=True)
    if summary["cls_prob"] == "missing":
        click.echo(f"note: {settings.fmt} carries no class distributions nor object ids: these shards serve "
                   "fine-tuning (vilbert-eval); pretraining refuses them", err=True)
    unreadable = len(summary["unreadable_files"])
    failures = f"failed {summary['failed']}" + (f", unreadable files {unreadable}" if unreadable else "")
    if summary["failed"] or unreadable:
        failures += f" (see {os.path.join(out, 'errors.jsonl')})"
    click.echo(f"done {summary['done']}, skipped {summary['skipped']}, {failures}; "
               f"{summary['records_per_second']} records/s")
    click.echo(json.dumps(summary), err=True)
    return summary


@click.command(context_settings=CONTEXT)
@click.argument("shards", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(("h5", "butd-tsv")), required=True,
              help="h5: volta's group per image; butd-tsv: generate_tsv.py's lines.")
@click.option("--distributions", is_flag=True,
              help="h5: also store the float16 cls_prob / attr_prob (beside obj_id / obj_conf).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_features(shards, out, fmt, distributions, quiet):
    """Write the samples of the shards in SHARDS (a folder, or one .tar) to the new file OUT in the format
    of other code: volta's HDF5, or a BUTD TSV."""
    from extractor.importers.export import export

    try:
        summary = export(shards, out, fmt, distributions=distributions, progress=not quiet)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as error:
        raise click.ClickException(str(error)) from error
    for line in summary["warnings"]:
        click.echo(f"warning: {line}", err=True)
    for problem in summary["unreadable_shards"]:
        click.echo(f"warning: {problem}; its samples before the damage are exported", err=True)
    for line in summary["skipped_samples"]:
        click.echo(f"warning: {line}; not exported", err=True)
    click.echo(f"exported {summary['exported']} samples to {out}, skipped {summary['skipped']}; "
               f"{summary['samples_per_second']} samples/s")
    return summary


def main(argv=None):
    """As every CLI's: with argv, returns the summary dict (a mistake raises click's exception);
    without, reads sys.argv and exits with the status."""
    return import_features.main(args=None if argv is None else list(argv), prog_name="vilbert-import",
                                standalone_mode=argv is None)


def export_main(argv=None):
    return export_features.main(args=None if argv is None else list(argv), prog_name="vilbert-export",
                                standalone_mode=argv is None)
