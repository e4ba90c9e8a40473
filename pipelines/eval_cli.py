"""`vilbert-eval`: fine-tune (optionally) and evaluate a ViLBERT model on a downstream task.

Writes OUT/results.json (metrics per split + the run's settings), OUT/predictions_SPLIT.json,
OUT/finetuned/ (the last fine-tuned weights, our checkpoint format), OUT/best/ (the weights of the
best validated epoch), OUT/checkpoints/ (to resume: re-run the same command) and, for refcoco+ with
--visualize N, OUT/visualize/SPLIT/*.png. Under torchrun (`torchrun --nproc_per_node 8 -m
pipelines.eval_cli ...`) it fine-tunes with DDP and evaluates each split in shares; rank 0 writes.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click
import torch

from common.devices import check_device
from common.options import FiniteFloat
from common.outputs import check_out_outside, writable_folder
from common.safe_load import regular_file
from pipelines.eval_checks import (
    check_feature_widths,
    check_fit,
    check_model_options,
    check_out_holds,
    check_val_labels,
    model_source,
    plain_split,
    run_lock,
)
from pipelines.tasks import TASKS
from pipelines.tasks.base import TaskOptions, autocast, log, write_json
from pipelines.tasks.distributed import barrier
from pipelines.train.distributed import resolve_device, setup_distributed, teardown_distributed

# task-specific options, passed to the task in TaskOptions.extra
TASK_OPTIONS = ("gt_features", "refs_file", "eval_on_gt", "hard_targets", "iou_rule", "visualize", "images",
                "score_head", "max_images", "pair_batch", "karpathy_file", "answers", "num_answers",
                "min_answer_count", "train_split")


def refuse_options_not_read(ctx, task_name: str) -> None:
    """A task's own option given to a task that does not read it (`--visualize` to nlvr2) is a usage
    error naming the tasks that read it: it was ignored without a word."""
    from pipelines.tasks.multitask_config import TASK_EXTRA

    for param in ctx.command.params:
        if param.name in TASK_OPTIONS and param.name not in TASK_EXTRA[task_name] and \
                ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE:
            readers = [name for name, options in TASK_EXTRA.items() if param.name in options]
            raise click.UsageError(f"{param.opts[0]} is an option of {', '.join(readers)}; --task {task_name} "
                                   "does not read it")


def _per_task(value) -> str:
    """"name value, ..." over the tasks, for the help texts."""
    return ", ".join(f"{name} {value(task)}" for name, task in TASKS.items())


def load_model(checkpoint, official_checkpoint, official_config, preset, device):
    from vilbert import ViLBert, load_official_checkpoint, load_preset, load_pretrained

    given = [x for x in (checkpoint, official_checkpoint, preset) if x]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --checkpoint, --official-checkpoint or --init-preset")
    if checkpoint:
        model = load_pretrained(checkpoint)
        source = f"checkpoint {checkpoint}"
    elif official_checkpoint:
        model, report = load_official_checkpoint(official_checkpoint, official_config)
        log.info("official checkpoint %s: %s", official_checkpoint, report.summary())
        source = f"official checkpoint {official_checkpoint}"
    else:
        from vilbert import ViLBertConfig

        if preset.endswith(".json") or Path(preset).exists():  # a file (a FIFO, a folder: one line, no hang)
            config = ViLBertConfig.from_json(regular_file(preset, "a model config JSON"))
        else:
            config = load_preset(preset)
        model = ViLBert(config)
        source = f"randomly initialised {preset}"
    return model.to(device), source


class Epochs(click.ParamType):
    """A positive number of epochs, or "official" (the task's vilbert_tasks.yml num_epoch)."""
    name = "EPOCHS|official"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "official":
            return value
        try:
            epochs = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'official'", param, ctx)
        if not epochs > 0 or epochs == float("inf"):
            self.fail(f"{value} is not a positive number of epochs", param, ctx)
        return epochs


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--task", "task_name", type=click.Choice(sorted(TASKS)), required=True, help="Downstream task.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Annotation folder of the task (see docs/tasks.md for each layout).")
@click.option("--features", type=click.Path(exists=True, file_okay=False), required=True,
              help="Region-feature shards from vilbert-extract, looked up by image id.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder; re-running the same command in it resumes the fine-tuning.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="Our checkpoint directory.")
@click.option("--official-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="vilbert-multi-task / vilbert_beta pytorch_model.bin, or a jackroos/VL-BERT .model "
                   "(pretrained or VQA fine-tuned, precomputed features).")
@click.option("--official-config", type=click.Path(exists=True, dir_okay=False),
              help="Official config JSON for --official-checkpoint (default: the vilbert-base preset).")
@click.option("--init-preset",
              help="Start from a randomly initialised preset name or config JSON (smoke tests, baselines).")
@click.option("--tokenizer", type=click.Path(exists=True), required=True,
              help="BERT tokenizer directory or vocab.txt (bert-base-uncased for the released models).")
@click.option("--epochs", type=Epochs(), help="Fine-tune for this many passes over the training items; 'official' "
              f"= the task's official count ({_per_task(lambda t: t.default_epochs)}). Default: evaluate only.")
@click.option("--train-steps", type=click.IntRange(0), default=0,
              help="Fine-tune for this many optimizer steps instead of --epochs; 0 = evaluate only (zero-shot).")
@click.option("--batch-size", type=click.IntRange(1), show_default=False,
              help="Items per optimizer step, all processes (retrieval: positives, x4 pairs; vcr: questions per "
                   "sub-task, x4 choices, Q->A and QA->R each). Default: the official per-task value "
                   f"({_per_task(lambda t: t.default_batch_size)}).")
@click.option("--micro-batch-size", type=click.IntRange(1), show_default=False,
              help="Items per forward pass and process; gradients are accumulated up to --batch-size, "
                   "which must be a multiple of it x processes (default: --batch-size / processes).")
@click.option("--eval-batch-size", type=click.IntRange(1), default=128,
              help="Evaluation batch size (vcr: input rows, 8 per question).")
@click.option("--lr", type=FiniteFloat(0, min_open=True),
              help="Peak learning rate (AdamW). Default: the official per-task value "
              f"({_per_task(lambda t: f'{t.default_lr:g}')}).")
@click.option("--warmup", type=FiniteFloat(0, 1), default=0.1,
              help="Linear warmup over this fraction of the steps, then linear decay to 0 (official 0.1).")
@click.option("--weight-decay", type=FiniteFloat(0), default=0.01, help="AdamW weight decay (not on biases/LayerNorm).")
@click.option("--val-split", show_default=False, callback=plain_split,
              help="Validated after each epoch; the best epoch by the task's metric is kept in OUT/best and "
                   "evaluated. 'none' = no validation. Default with --epochs: "
              f"{_per_task(lambda t: t.val_split)}; with --train-steps: none.")
@click.option("--save-every", type=click.IntRange(0), default=1000,
              help="Save a resumable checkpoint every N steps (0: never), and after each epoch of --epochs and at "
                   "the end.")
@click.option("--keep-last", type=click.IntRange(1), default=2, help="Resumable checkpoints kept in OUT/checkpoints.")
@click.option("--workers", type=click.IntRange(0), default=2,
              help="DataLoader processes building batches, per process (0: a background thread).")
@click.option("--compile/--no-compile", "compile_model", default=False,
              help="torch.compile the fine-tuning step (first steps compile).")
@click.option("--compile-mode",
              type=click.Choice(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
              default="default", help="torch.compile mode; reduce-overhead = CUDA graphs.")
@click.option("--max-seq-length", type=click.IntRange(3), help="Max tokens incl. [CLS]/[SEP]. Default: the official "
              f"per-task value ({_per_task(lambda t: getattr(t, 'shown_max_seq_length', t.default_max_seq_length))}).")
@click.option("--max-regions", type=click.IntRange(2), default=101, help="Max visual positions incl. [IMG].")
@click.option("--split", "splits", multiple=True, callback=plain_split, help="Evaluation split (repeatable). Default: "
              f"{_per_task(lambda t: '/'.join(t.default_splits))}.")
@click.option("--task-token", type=int, help="Task token id for multi-task checkpoints (default: the "
              f"official id of the task: {_per_task(lambda t: getattr(t, 'shown_task_id', t.official_task_id))}).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available; under torchrun "
                                               "cuda is each process's LOCAL_RANK GPU).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="Random seed.")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (CUDA only; ignored on CPU).")
@click.option("--gt-boxes", "gt_features", type=click.Path(exists=True, file_okay=False),
              help="refcoco/+/g: shards of ground-truth-box regions (vilbert-extract --gt-boxes), mixed into training; "
                   "vcr: the regions of the annotated objects, added to the detections (training and evaluation).")
@click.option("--refs-file", help="refcoco, refcoco+, refcocog: the refs pickle in --data "
                                  "(default refs(unc).p; refcocog: refs(umd).p).")
@click.option("--eval-on-gt-boxes", "eval_on_gt", is_flag=True, help="refcoco/+/g: evaluate on the --gt-boxes regions.")
@click.option("--hard-targets", is_flag=True, help="refcoco/+/g: 1/0 targets instead of the IoU (>= 0.5); VL-BERT "
              "always trains on its official 1/0 targets (IoU > 0.5).")
@click.option("--iou-rule", type=click.Choice(["vilbert-multi-task", "vl-bert", "refer", "continuous"]),
              help="refcoco/+/g: how a box is judged: vilbert-multi-task (end pixels counted, IoU > 0.5), vl-bert "
                   "(end pixels counted, >= 0.5), refer (the refer toolkit's computeIoU, >= 0.5), continuous "
                   "(no pixel convention, >= 0.5); see docs/tasks.md. Default: the official evaluation of the "
                   "model's code (vl-bert for a VL-BERT, else vilbert-multi-task).")
@click.option("--visualize", type=click.IntRange(0), default=0,
              help="refcoco/+/g: draw the first N predictions per split.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, readable=True),
              help="refcoco/+/g: COCO image folder for --visualize (else a grey canvas).")
@click.option("--score-head", type=click.Choice(["auto", "alignment", "retrieval"]), default="auto",
              help="retrieval: score pairs with the alignment head or a 'retrieval' head "
                   "(auto: the latter if present).")
@click.option("--max-images", type=click.IntRange(1), help="retrieval: evaluate on the first N images only.")
@click.option("--karpathy-file", help="retrieval: the Karpathy split file in --data to read (e.g. dataset_coco.json) "
                                      "when it holds several, or instead of SPLIT.jsonl.")
@click.option("--pair-batch", type=click.IntRange(1), default=256,
              help="retrieval: (caption, image) pairs per forward pass.")
@click.option("--answers", type=click.Path(exists=True, dir_okay=False),
              help="vqa, gqa: answer vocabulary (.json list, .txt, or the released label2ans .pkl).")
@click.option("--num-answers", type=click.IntRange(1), show_default="3129 for vqa, 1533 for gqa",
              help="vqa, gqa: vocabulary size built from the train annotations.")
@click.option("--min-answer-count", type=click.IntRange(1), default=9,
              help="vqa: a built vocabulary keeps answers given by at least this many training questions.")
@click.option("--train-split", default="train", callback=plain_split,
              help="vqa, gqa: split(s) used for fine-tuning, e.g. train,val.")
@click.option("--save/--no-save", default=True,
              help="Save the last fine-tuned weights to OUT/finetuned; --no-save keeps no weights (OUT/checkpoints "
                   "and OUT/best are removed when the run is done).")
def cli(task_name, checkpoint, official_checkpoint, official_config, init_preset, save, compile_model, **kw):
    """Fine-tune and evaluate a model on a downstream task (--task; docs/tasks.md gives each
    task's data layout, metric and official numbers)."""
    try:
        kw["device"] = check_device(kw["device"])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    try:
        info = setup_distributed(kw["device"])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(asctime)s %(message)s")
    kw["device"] = str(resolve_device(kw["device"], info.local_rank))
    torch.manual_seed(kw["seed"])
    refuse_options_not_read(click.get_current_context(), task_name)
    extra = {k: kw.pop(k) for k in TASK_OPTIONS}
    extra["soft_targets"] = not extra.pop("hard_targets")
    out = Path(kw.pop("out"))
    if kw["epochs"] and kw["train_steps"]:
        raise click.UsageError("give --epochs or --train-steps, not both")
    if kw["val_split"] in ("none", ""):
        kw["val_split"] = ""
    try:
        writable_folder(out, "--out")  # before any fine-tuning, not after it
        check_out_outside(out, {"--data": kw["data"], "--features": kw["features"], "--gt-boxes": extra["gt_features"],
                                "--images": extra["images"]})
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    opts = TaskOptions(data=Path(kw.pop("data")), features=Path(kw.pop("features")), out=out, compile=compile_model,
                       tokenizer=Path(kw.pop("tokenizer")), splits=tuple(dict.fromkeys(kw.pop("splits"))),  # once each
                       extra=extra, **kw)
    models = (checkpoint, official_checkpoint, official_config, init_preset)
    try:
        check_out_holds(out, task_name, bool(kw["train_steps"] or kw["epochs"]),
                        {"--checkpoint": checkpoint, "--official-checkpoint": official_checkpoint})
        with run_lock(out, info):  # one run at a time in OUT
            return run_task(task_name, opts, info, models, save)
    except (FileNotFoundError, ValueError, KeyError, FloatingPointError) as e:
        raise click.ClickException(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from e


def run_task(task_name: str, opts: TaskOptions, info, models: tuple, save: bool) -> dict:
    """The checks, the fine-tuning (when asked) and the evaluation of the splits -> the results."""
    checkpoint, official_checkpoint, official_config, init_preset = models
    out = opts.out
    task = TASKS[task_name](opts)
    fine_tune = bool(opts.train_steps or opts.epochs)
    if fine_tune:  # evaluation inputs checked before the fine-tuning, not after it
        checked = [*(opts.splits or task.default_splits), *([opts.val_split] if opts.val_split else [])]
        for split in dict.fromkeys(checked):
            task.eval_inputs(split)
        check_val_labels(task, opts.val_split)
    model, source = load_model(checkpoint, official_checkpoint, official_config, init_preset, opts.device)
    check_fit(model.config, len(task.tokenizer), task.opts, source)
    check_feature_widths(task, model.config, source)
    check_model_options(model, task, opts, fine_tune)
    task.prepare(model)
    model.to(opts.device)
    t0 = time.time()
    results = {"task": task_name, "model": source, "train_steps": 0, "splits": {}, "train_loss_first": None,
               "train_loss_last": None}
    tuner = None
    if fine_tune:
        settings_source = model_source(checkpoint, official_checkpoint, init_preset, official_config)
        tuner, tuned = fine_tune_model(model, task, opts, info, source, save, settings_source)
        results.update(tuned)
    for split in opts.splits or task.default_splits:
        with autocast(opts):
            metrics, preds = task.evaluate(model, split)
        results["splits"][split] = metrics
        if info.is_main:
            write_json(out / f"predictions_{split}.json", preds)
            click.echo(f"{task_name} {split}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    results["seconds"] = round(time.time() - t0, 1)
    if info.is_main:
        write_json(out / "results.json", results)
        if tuner is not None and not save:  # --no-save keeps no weights: the run's are dropped once it is done
            tuner.drop_weights()
    return results


def fine_tune_model(model, task, opts, info, source: str, save: bool, settings_source: str = ""):
    """Fine-tune (resuming from OUT/checkpoints), save OUT/finetuned, and leave the model holding
    the weights that are evaluated: the best validated epoch's (OUT/best), else the last ones.
    -> (the FineTuner, the results of the fine-tuning)."""
    from pipelines.tasks.finetune import FineTuner
    from pipelines.train.checkpoints import save_model_dir
    from vilbert import load_pretrained

    tuner = FineTuner(model, task, opts, info, torch.device(opts.device), source=settings_source or source)
    tuner.resume()
    run = tuner.run()
    losses, plan = run["losses"], run["plan"]
    k = max(1, len(losses) // 10)
    results = {"train_steps": plan["total_steps"], "epochs": round(plan["total_steps"] / plan["steps_per_epoch"], 4),
               "batch_size": plan["batch"], "processes": plan["world"],
               "train_loss_first": sum(losses[:k]) / k,  # mean of the first 10% of steps
               "train_loss_last": sum(losses[-k:]) / k,  # and of the last 10%
               "history": run["history"], "best": run["best"], "evaluated": "last"}
    if save and info.is_main:
        save_model_dir(model, Path(opts.out) / "finetuned", {"task": task.name, "train_steps": plan["total_steps"],
                                                             "from": source, **tuner.task_metadata()})
    if run["best"] is not None:
        barrier()  # OUT/best is written by rank 0
        model.load_state_dict(load_pretrained(Path(opts.out) / "best", map_location=opts.device).state_dict())
        results["evaluated"] = f"best: epoch {run['best']['epoch']:g}, {run['best']['split']} " \
                               f"{run['best']['metric']} {run['best']['value']:.4f}"
    model.eval()
    return tuner, results


def main(argv=None):
    """As every CLI's: with argv, returns the results (a mistake raises click's exception); without,
    reads sys.argv and exits with the status."""
    try:
        return cli.main(args=argv, prog_name="vilbert-eval", standalone_mode=argv is None)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
