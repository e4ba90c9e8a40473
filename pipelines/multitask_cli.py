"""`vilbert-multitask CONFIG.yaml --out OUT`: 12-in-1 multi-task fine-tuning of one ViLBERT model on
the tasks of a config file (pipelines/tasks/multitask.py has the file's fields and the schedule).

Writes OUT/TASK/metrics.json (each validation of the task) and OUT/TASK/predictions_SPLIT.json,
OUT/finetuned/ (the final model with every task's head; `vilbert-eval --task TASK --checkpoint
OUT/finetuned` evaluates it), OUT/checkpoints/ (re-run the same command to resume) and
OUT/results.json, and prints a table of the tasks at the end. Under torchrun (`torchrun
--nproc_per_node 8 -m pipelines.multitask_cli CONFIG ...`) it trains with DDP, each process reading its
share of every task's batch, and validates and evaluates in shares; rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import torch

from common.devices import check_device
from common.outputs import check_out_outside, writable_folder
from pipelines.eval_checks import check_feature_widths, model_source, run_lock
from pipelines.eval_cli import check_fit, load_model
from pipelines.tasks import TASKS
from pipelines.tasks.base import TaskOptions, autocast, write_json
from pipelines.tasks.multitask import val_split_of
from pipelines.tasks.multitask_config import EXTRA_PATHS
from pipelines.train.distributed import resolve_device, setup_distributed, teardown_distributed


def _made_by_us(folder: Path) -> bool:
    """Whether `folder` is an OUT/finetuned this command wrote (save_model_dir with its metadata)."""
    try:
        meta = json.loads((folder / "config.json").read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and {"tasks", "from", "iterations"} <= set(meta)


def inputs_of(config, checkpoint, official_checkpoint) -> dict:
    """The paths a run reads, by the field or option that names them (OUT must lie outside them)."""
    inputs = {"tokenizer": config.tokenizer, "--checkpoint": checkpoint, "--official-checkpoint": official_checkpoint}
    for i, e in enumerate(config.tasks):
        inputs.update({f"tasks[{i}].data": e.data, f"tasks[{i}].features": e.features,
                       f"tasks[{i}].tokenizer": e.tokenizer,
                       **{f"tasks[{i}].extra.{k}": e.extra.get(k) for k in EXTRA_PATHS}})
    return {k: Path(v) for k, v in inputs.items() if v}


def build_tasks(config, config_path: Path, out: Path, device: str) -> list:
    """The Task of each entry (its annotations, features and tokenizer read); a mistake names the entry."""
    tasks = []
    for i, e in enumerate(config.tasks):
        cls = TASKS[e.task]
        val = val_split_of(e)
        opts = TaskOptions(data=e.data, features=e.features, out=out / e.task,
                           tokenizer=e.tokenizer or config.tokenizer,
                           max_seq_length=e.max_seq_length, max_regions=config.max_regions, batch_size=e.batch_size,
                           micro_batch_size=e.micro_batch_size, eval_batch_size=config.eval_batch_size, epochs=1.0,
                           lr=e.lr, warmup=config.warmup, weight_decay=config.weight_decay, clip_grad=config.clip_grad,
                           val_split=val, workers=config.workers, seed=config.seed, device=device,
                           splits=tuple(e.splits), task_token=e.task_token, bf16=config.bf16, extra=dict(e.extra))
        try:
            task = cls(opts)
            for split in dict.fromkeys([*([val] if val else []), *e.splits]):  # checked before any training
                task.eval_inputs(split)
            if val and not getattr(task, "has_labels", lambda split: True)(val):
                raise ValueError(f"val_split {val}: the split has no labels in {e.data}, so it cannot be validated "
                                 "(its plateaus decided); validate on a labelled split, or val_split: none")
        except (FileNotFoundError, ValueError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ValueError(f"{config_path}: tasks[{i}] ({e.task}): {message}") from None
        tasks.append(task)
    return tasks


def fit_model(model, tasks: list, source: str, config_path: Path) -> None:
    """Tokenizers, region features and task tokens that fit the model, then every task's head on it."""
    for i, task in enumerate(tasks):
        token, n = task.opts.task_token, model.config.num_task_tokens
        if model.config.task_specific_tokens and token is not None and token >= n:
            raise ValueError(f"{config_path}: tasks[{i}].task_token: {token} is not one of the model's {n} task "
                             f"tokens (0..{n - 1}, num_task_tokens of {source})")
        check_fit(model.config, len(task.tokenizer), task.opts, source)
        check_feature_widths(task, model.config, source)
        task.prepare(model)


def summary_table(results: dict) -> str:
    rows = [("task", "token", "lr", "loss x", "batches", "passes", "validations", "metric", "last", "best")]
    for name, r in results["tasks"].items():
        values = [h[r["metric"]] for h in r["history"]]
        token = "-" if r["task_token"] is None else str(r["task_token"])
        rows.append((name, token, f"{r['lr']:g}", f"{r['loss_scale']:g}", str(r["batches"]),
                     f"{r['passes']:g}", str(len(values)), f"{r['val_split'] or '-'} {r['metric']}",
                     f"{values[-1]:.4f}" if values else "-", f"{max(values):.4f}" if values else "-"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder; re-running the same command in it resumes the training.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="Our checkpoint directory.")
@click.option("--official-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="vilbert-multi-task / vilbert_beta pytorch_model.bin.")
@click.option("--official-config", type=click.Path(exists=True, dir_okay=False),
              help="Official config JSON for --official-checkpoint (default: the vilbert-base preset).")
@click.option("--preset", help="Start from a randomly initialised preset name or config JSON (smoke tests).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available; under torchrun "
                                               "cuda is each process's LOCAL_RANK GPU).")
@click.option("--workers", type=click.IntRange(0), help="DataLoader processes per task (default: the config's).")
def cli(config_path, out, checkpoint, official_checkpoint, official_config, preset, device, workers):
    """Train one model on the tasks of CONFIG (YAML or JSON: a `tasks` list of {task, data, features,
    ...} and shared settings; docs/tasks.md), vilbert-multi-task's train_tasks.py schedule. Under
    torchrun: DDP, batch sizes over all processes."""
    from pipelines.tasks.multitask import ConfigError, add_task_tokens, load_config
    from pipelines.tasks.multitask_config import check_batch, check_out_paths

    if len([x for x in (checkpoint, official_checkpoint, preset) if x]) != 1:
        raise click.UsageError("give exactly one of --checkpoint, --official-checkpoint or --preset")
    try:
        device = check_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    info = setup_distributed(device)  # NCCL on GPU, gloo on CPU; one process outside torchrun
    try:
        device = str(resolve_device(device, info.local_rank))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(asctime)s %(message)s")
    out = Path(out)
    try:
        config = load_config(config_path)
        writable_folder(out, "--out")
        try:
            check_out_outside(out, inputs_of(config, checkpoint, official_checkpoint))
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        check_out_paths(out, config, [val_split_of(e) for e in config.tasks], _made_by_us)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if workers is not None:
        config.workers = workers
    torch.manual_seed(config.seed)
    try:
        with run_lock(out, info, "vilbert-multitask"):  # rank 0 takes OUT's lock, every process hears
            tasks = build_tasks(config, Path(config_path), out, device)
            for i, task in enumerate(tasks):
                check_batch(Path(config_path), i, task.opts.batch_size, task.opts.micro_batch_size, info.world_size)
            model, source = load_model(checkpoint, official_checkpoint, official_config, preset, device)
            if config.task_tokens:
                add_task_tokens(model, config.seed)
            fit_model(model, tasks, source, Path(config_path))
            model.to(device)
            results = train_and_evaluate(model, tasks, config, config_path, out, device, info, source,
                                         model_source(checkpoint, official_checkpoint, preset, official_config))
    except (FileNotFoundError, ValueError, KeyError, FloatingPointError) as e:
        raise click.ClickException(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from e
    if info.is_main:
        click.echo(summary_table(results))
    return results


def train_and_evaluate(model, tasks, config, config_path, out: Path, device: str, info, source: str,
                       weights: str) -> dict:
    """Train (resuming from OUT/checkpoints), save OUT/finetuned, evaluate every task's splits, write
    OUT/results.json -> the results."""
    from pipelines.tasks.multitask_train import MultiTaskTrainer
    from pipelines.train.checkpoints import save_model_dir

    t0 = time.time()
    trainer = MultiTaskTrainer(model, tasks, config, out, torch.device(device), info, weights)
    trainer.resume()
    results = {"config": str(config_path), "model": source, **trainer.run()}
    if info.is_main:
        save_model_dir(model, out / "finetuned", {"tasks": [t.name for t in tasks], "from": source,
                                                  "iterations": results["iterations"],
                                                  "task_settings": trainer.task_settings()})
    for task in tasks:
        r = results["tasks"][task.name]
        official = getattr(task, "shown_task_id", task.official_task_id)  # vcr: 5/6
        r["task_token"] = (task.opts.task_token if task.opts.task_token is not None else official) \
            if model.config.task_specific_tokens else None
        r["splits"] = {}
        for split in task.opts.splits:  # with the final model, all processes in shares
            with autocast(task.opts):
                metrics, preds = task.evaluate(model, split)
            r["splits"][split] = metrics
            if info.is_main:
                write_json(out / task.name / f"predictions_{split}.json", preds)
    results["seconds"] = round(time.time() - t0, 1)
    if info.is_main:
        write_json(out / "results.json", results)
    return results


def main(argv=None):
    """As every CLI's: with argv, returns the results (a mistake raises click's exception); without,
    reads sys.argv and exits with the status."""
    try:
        return cli.main(args=argv, prog_name="vilbert-multitask", standalone_mode=argv is None)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
