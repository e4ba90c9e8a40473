"""`vilbert-train SHARDS`: stream region-feature shards into ViLBERT / VL-BERT pretraining.

One process, or many with torchrun (`torchrun --nproc_per_node 8 -m pipelines.train_cli ...`);
re-running the same command resumes from the newest checkpoint in --out. The loss curves can be
redrawn at any time with `python -m pipelines.train.metrics OUT`.
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
import torch

from common.devices import check_device
from common.options import FiniteFloat
from common.outputs import check_out_outside, disk_full, is_disk_full, writable_folder

from .data.loader import DataConfig, NoUsableSamples, PretrainingData, PretrainingLoader, make_loader
from .data.shards import (
    ErrorCounter,
    RecipeMismatch,
    expand_shards,
    local_dirs,
    read_recipe,
    refuse_without_class_targets,
    region_widths,
)
from .data.text_corpus import SEQ_LEN, TEXT_RATIO, TextCorpus, TextMixer, TextStream, expand_text_corpus
from .eval_checks import run_lock
from .train.checkpoints import list_checkpoints
from .train.distributed import teardown_distributed
from .train.trainer import TrainConfig, Trainer

log = logging.getLogger("vilbert.train")


def _parse_overrides(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE (VALUE in JSON, e.g. hidden_size=64)")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@contextmanager
def user_errors():
    """Setup mistakes (a missing path, an unknown preset or config field, unusable shards) end the
    command with one line naming the cause, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, NoUsableSamples) as error:
        raise click.ClickException(str(error)) from error


def _check_eval_shards(eval_shards: str, data: PretrainingData, allow_mixed: bool, out) -> None:
    """--eval-shards that exist, carry class distributions and have the training shards' feature and
    class-distribution widths (the held-out pass would skip every sample of other widths) and, unless
    --allow-mixed-recipes, their feature recipe (numbers of other features would pass for these)."""
    widths, widths_source = data.widths, data.widths_source
    try:
        urls = expand_shards(eval_shards)
        refuse_without_class_targets(urls)
        found, source = region_widths(urls)
        recipe = None if allow_mixed else read_recipe(urls)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(f"--eval-shards: {error}") from error
    with user_errors():
        for folder in local_dirs(urls):
            check_out_outside(out, {"--eval-shards": folder})
    if recipe is not None and recipe != data.recipe:
        raise click.ClickException(f"--eval-shards: {eval_shards}: feature recipe {recipe}, but the training "
                                   f"shards' is {data.recipe}: evaluate on features made the same way (or pass "
                                   "--allow-mixed-recipes)")
    if tuple(found) != tuple(widths):
        raise click.ClickException(f"--eval-shards: {source}: region features {found[0]} wide and class "
                                   f"distributions {found[1]}, but the training shards' ({widths_source}) are "
                                   f"{widths[0]} and {widths[1]}: evaluate on shards of the same feature recipe")


def _stream_seed(seed: int, step: int) -> int:
    """A resumed run must not replay the samples it already trained on: seed the stream by step."""
    return seed * 1_000_003 + step


OPTS = dict(show_default=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("shards")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/pretrain"),
              help="run directory: checkpoints, logs, curves", **OPTS)
@click.option("--preset", default="vilbert-base",
              help="model preset (vilbert-base, vilbert-tiny, vlbert-base, vlbert-tiny)", **OPTS)
@click.option("--arch", type=click.Choice(["vilbert", "vlbert"]), default=None,
              help="override the preset's architecture")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a model config field, e.g. --set v_num_hidden_layers=4")
@click.option("--bert", type=click.Path(path_type=Path, exists=True), default=None,
              help="local BERT directory initialising the text stream (random init if absent)")
@click.option("--tokenizer", type=click.Path(path_type=Path, exists=True), default=None,
              help="tokenizer directory or vocab.txt (default: --bert)")
@click.option("--objective", type=click.Choice(["0", "1", "2", "vlbert"]), default=None,
              help="ViLBERT's (arch vilbert; default 1): 0: masked losses on mismatched pairs too; 1: not (official "
                   "pretraining); 2: no negatives. vlbert: VL-BERT's (arch vlbert; its default): MLM, masked-RoI "
                   "classification, no relationship loss")
@click.option("--text-corpus", default=None, metavar="PATTERN",
              help="objective vlbert: UTF-8 text files ('corpus/*.txt', a directory) trained with MLM in the same "
                   "run, as VL-BERT's general_corpus")
@click.option("--text-ratio", type=FiniteFloat(0, 64, min_open=True), default=TEXT_RATIO,
              help="text-only rows per caption row (official: 1, a batch of each per step)", **OPTS)
@click.option("--text-seq-len", type=click.IntRange(1), default=SEQ_LEN,
              help="WordPiece tokens per text-only row (official 64)", **OPTS)
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=1e-4, **OPTS)
@click.option("--bert-lr-scale", type=FiniteFloat(0), default=0.1,
              help="learning-rate factor for BERT-initialised weights", **OPTS)
@click.option("--weight-decay", type=FiniteFloat(0), default=0.01, **OPTS)
@click.option("--warmup", type=FiniteFloat(0, 1), default=0.1, help="fraction of steps with linear warmup", **OPTS)
@click.option("--batch-size", type=click.IntRange(1), default=512,
              help="samples per optimizer step, all processes", **OPTS)
@click.option("--micro-batch-size", type=click.IntRange(1), default=64,
              help="samples per forward pass and process; gradient accumulation fills --batch-size, which must be a "
                   "multiple of it x processes", **OPTS)
@click.option("--epochs", type=FiniteFloat(0, min_open=True), default=10.0, **OPTS)
@click.option("--samples-per-epoch", type=click.IntRange(0), default=0,
              help="virtual epoch size; 0 = the shards' sizes.json", **OPTS)
@click.option("--max-steps", type=click.IntRange(0), default=0,
              help="stop after this many optimizer steps; 0 = from --epochs", **OPTS)
@click.option("--clip-grad", type=FiniteFloat(0), default=1.0, help="max gradient norm (0 = off)", **OPTS)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto: bf16 autocast on GPU, fp32 on CPU "
                   "(bf16 measured 2.2-2.6x faster than fp32 on a CPU with AVX-512 BF16)", **OPTS)
@click.option("--compile/--no-compile", "compile_model", default=False,
              help="torch.compile the model (one graph; first step compiles)", **OPTS)
@click.option("--compile-mode",
              type=click.Choice(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
              default="default", help="torch.compile mode; reduce-overhead = CUDA graphs", **OPTS)
@click.option("--profile-steps", type=click.IntRange(0), default=0,
              help="record N steps (after 5) with torch.profiler into OUT/profile", **OPTS)
@click.option("--device", default="auto", help="auto, cpu, cuda", **OPTS)
@click.option("--workers", type=click.IntRange(0), default=4,
              help="data-loading processes per training process", **OPTS)
@click.option("--shuffle-buffer", type=click.IntRange(1), default=1000, **OPTS)
@click.option("--max-seq-len", type=click.IntRange(3), default=36, **OPTS)
@click.option("--max-regions", type=click.IntRange(1), default=36, **OPTS)
@click.option("--allow-mixed-recipes", is_flag=True, help="accept shards extracted with different detectors / settings")
@click.option("--save-every", type=click.IntRange(1), default=1000,
              help="checkpoint every N steps (and at the end)", **OPTS)
@click.option("--keep-last", type=click.IntRange(1), default=3, help="checkpoints to keep", **OPTS)
@click.option("--log-every", type=click.IntRange(1), default=10, **OPTS)
@click.option("--nan-policy", type=click.Choice(["skip", "stop"]), default="skip",
              help="on a non-finite loss: skip the update or stop", **OPTS)
@click.option("--resume", "resume_from", default="auto",
              help="auto: continue from the newest checkpoint in --out; never: refuse if there is one; "
                   "or a checkpoint directory", **OPTS)
@click.option("--eval-shards", default=None,
              help="shards for a held-out pass at the end (losses and accuracies -> OUT/eval.json)")
@click.option("--seed", type=int, default=0, **OPTS)
def cli(shards, out, preset, arch, overrides, bert, tokenizer, objective, text_corpus, text_ratio, text_seq_len, lr,
        bert_lr_scale, weight_decay, warmup, batch_size, micro_batch_size, epochs, samples_per_epoch, max_steps,
        clip_grad, precision, compile_model,
        compile_mode, profile_steps, device, workers, shuffle_buffer, max_seq_len, max_regions, allow_mixed_recipes,
        save_every, keep_last, log_every, nan_policy, resume_from, eval_shards, seed):
    """Pretrain on SHARDS (a directory, a brace pattern such as 'cc-{000000..000331}.tar', or a
    pipe: URL): ViLBERT's masked language modelling, masked region modelling and image-caption alignment,
    or VL-BERT's masked language modelling (captions and --text-corpus) and masked RoI classification."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tokenizer = tokenizer or bert
    if tokenizer is None:
        raise click.UsageError("pass --tokenizer (a BERT vocab.txt or tokenizer directory) or --bert")
    if micro_batch_size > batch_size:  # one forward pass would already be a larger step than asked for
        raise click.UsageError(f"--batch-size {batch_size} is smaller than --micro-batch-size {micro_batch_size}: "
                               f"give a --batch-size of at least {micro_batch_size} or a smaller --micro-batch-size")
    with user_errors():
        check_device(device)
        writable_folder(out, "--out")
    model_overrides = _parse_overrides(overrides)
    if arch:
        model_overrides["arch"] = arch
    objective = None if objective is None else (objective if objective == "vlbert" else int(objective))
    data_cfg = DataConfig(shards=shards, tokenizer=str(tokenizer), batch_size=micro_batch_size, max_seq_len=max_seq_len,
                          max_regions=max_regions, objective=1 if objective is None else objective,  # set below
                          samples_per_epoch=samples_per_epoch,
                          shuffle_buffer=shuffle_buffer, num_workers=workers, allow_mixed_recipes=allow_mixed_recipes,
                          # on a GPU, features travel as float16 (half the bytes) and are cast there
                          half_features=device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()))
    with user_errors():
        data = PretrainingData(data_cfg, train=True)  # checks shards, recipe and tokenizer before any model is built
        for folder in local_dirs(data.urls):
            check_out_outside(out, {"SHARDS": folder})
    if data.widths is None:
        raise click.ClickException(data.widths_source)
    width, width_source = data.widths[0], data.widths_source
    if eval_shards:
        _check_eval_shards(eval_shards, data, allow_mixed_recipes, out)  # now, not after days of training
    if not bert and "vocab_size" not in model_overrides:
        model_overrides["vocab_size"] = data.tokenizer.vocab_size
    if model_overrides.setdefault("v_feature_size", width) != width:
        raise click.ClickException(f"{width_source}: region features are {width} wide, but --set "
                                   f"v_feature_size={model_overrides['v_feature_size']} was given")
    train_cfg = TrainConfig(
        out=out, preset=preset, model_overrides=model_overrides, bert=bert, objective=objective, lr=lr,
        bert_lr_scale=bert_lr_scale, weight_decay=weight_decay, warmup=warmup, batch_size=batch_size,
        micro_batch_size=micro_batch_size, epochs=epochs, samples_per_epoch=samples_per_epoch, max_steps=max_steps,
        clip_grad=clip_grad, precision=precision, compile=compile_model, text_corpus=text_corpus,
        text_ratio=text_ratio if text_corpus else None, text_seq_len=text_seq_len if text_corpus else None,
        compile_mode=compile_mode, profile_steps=profile_steps, save_every=save_every, keep_last=keep_last,
        log_every=log_every, nan_policy=nan_policy, seed=seed, device=device,
    )
    with user_errors():
        trainer = Trainer(train_cfg, recipe=data.recipe)
    with ExitStack() as held:
        with user_errors():
            held.enter_context(run_lock(Path(out), trainer.dist, "vilbert-train"))  # one run at a time in OUT
        return _train(trainer, data, data_cfg, shards, out, text_corpus, text_ratio, text_seq_len, max_seq_len,
                      resume_from, allow_mixed_recipes, eval_shards, seed)


def _train(trainer, data, data_cfg, shards, out, text_corpus, text_ratio, text_seq_len, max_seq_len, resume_from,
           allow_mixed_recipes, eval_shards, seed):
    """The checks that need the model, the resume, the training and the held-out pass (OUT locked)."""
    config = trainer.model.config
    data_cfg.objective = trainer.cfg.objective  # resolved for the architecture
    corpus_errors, corpus = ErrorCounter(), None
    if text_corpus:
        if trainer.cfg.objective != "vlbert":
            raise click.ClickException(f"--text-corpus is VL-BERT's (objective vlbert); this run's objective is "
                                       f"{trainer.cfg.objective}")
        if text_seq_len + 2 > config.max_position_embeddings:
            raise click.ClickException(f"--text-seq-len {text_seq_len} + 2 is longer than the model's "
                                       f"max_position_embeddings {config.max_position_embeddings}")
        with user_errors():
            corpus = TextCorpus(expand_text_corpus(text_corpus), corpus_errors)
    if data.tokenizer.vocab_size > config.vocab_size:
        raise click.ClickException(f"--tokenizer has {data.tokenizer.vocab_size} tokens, the model reads "
                                   f"{config.vocab_size} (--set vocab_size or --bert)")
    if max_seq_len > config.max_position_embeddings:
        raise click.ClickException(f"--max-seq-len {max_seq_len} is longer than the model's "
                                   f"max_position_embeddings {config.max_position_embeddings}")
    if data.widths[1] != config.v_target_size:
        raise click.ClickException(f"{data.widths_source}: class distributions are {data.widths[1]} wide, the model "
                                   f"predicts {config.v_target_size} (--set v_target_size={data.widths[1]})")
    if resume_from == "never" and list_checkpoints(trainer.ckpt_root):
        raise click.ClickException(f"{trainer.ckpt_root} holds checkpoints and --resume never was given; "
                                   "choose another --out or drop --resume never")
    if resume_from not in ("auto", "never") and not Path(resume_from, "trainer_state.pt").is_file():
        raise click.ClickException(f"{resume_from}: not a training checkpoint (no trainer_state.pt)")
    with user_errors():
        resumed = resume_from != "never" and trainer.resume(None if resume_from == "auto" else Path(resume_from))
    if resumed:
        saved = trainer.resumed_metadata.get("feature_recipe")
        if saved and saved != data.recipe and not allow_mixed_recipes:
            raise click.ClickException(f"{out}: the checkpoint was trained on features {saved}, these shards are "
                                       f"{data.recipe}; pass --allow-mixed-recipes to continue anyway")
    data_cfg.seed = _stream_seed(seed, trainer.step)  # read when the pipeline is built, below
    loader = PretrainingLoader(data)  # the shards, recipe and tokenizer checked above, not read again
    batches = loader.forever()
    if corpus is not None:  # every text row a function of (seed, row): resumes at the row the step reached
        stream = TextStream(corpus, data.tokenizer, text_seq_len, seed=seed, rank=trainer.dist.rank,
                            world_size=trainer.dist.world_size)
        batches = TextMixer(stream, text_ratio, start=trainer.step * trainer.accumulation)(batches)
    first_step, skipped_before = trainer.step, trainer.skipped
    if resumed and trainer.cfg.max_steps and trainer.step >= trainer.cfg.max_steps and trainer.dist.is_main:
        click.echo(f"note: the run is at step {trainer.step}, --max-steps {trainer.cfg.max_steps}: nothing to train "
                   "(give a larger --max-steps to continue)", err=True)
    try:
        last = trainer.fit(batches, samples_per_epoch=loader.samples_per_epoch)
    except FloatingPointError as error:  # --nan-policy stop: the checkpoints saved before it are intact
        raise click.ClickException(f"{error}: stopped (--nan-policy stop); the checkpoints saved before it are "
                                   "intact") from None
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise click.ClickException(disk_full(out, error, "the checkpoints already saved are intact")) from None
    except (NoUsableSamples, RecipeMismatch) as error:  # the run stops, with its checkpoints, on one line
        reason = str(error)  # from a DataLoader worker, it holds the worker's traceback before the reason
        name = type(error).__name__
        reason = reason.rsplit(f"{name}: ", 1)[-1].strip() if "Traceback" in reason else reason
        raise click.ClickException(f"{shards}: {reason}") from error
    errors = loader.error_counts()
    errors["unreadable_text_files"] = corpus_errors.counts()["unreadable_text_files"]
    steps, skipped = trainer.step - first_step, trainer.skipped - skipped_before
    if trainer.dist.is_main:
        if any(errors.values()):
            click.echo(f"skipped data: {errors}", err=True)
        if skipped:
            click.echo(f"skipped updates: {skipped} of {steps} steps had a non-finite loss or gradient "
                       "(each is logged above with its batch keys)", err=True)
        if last:
            aligned = "" if trainer.cfg.objective == "vlbert" else f"alignment accuracy {last['align_accuracy']:.3f}, "
            click.echo(f"step {trainer.step}: loss {last['loss']:.4f}, {aligned}"
                       f"MLM accuracy {last['mlm_accuracy']:.3f}"
                       + "".join(f", {name} {last[key]:.3f}" for key, name in (
                           ("mlm_text_accuracy", "text-only MLM accuracy"), ("mrc_accuracy", "masked-RoI accuracy"))
                           if key in last))
    if steps and skipped * 2 > steps:  # the checkpoint is saved, but this run did not train
        raise click.ClickException(f"{skipped} of {steps} updates were skipped (non-finite loss or gradient): "
                                   "check the data (NaN or infinite features) and the learning rate")
    if eval_shards:
        eval_cfg = DataConfig(**{**data_cfg.__dict__, "shards": eval_shards, "samples_per_epoch": 0, "seed": None})
        with user_errors():
            eval_loader = make_loader(eval_cfg, train=False)
        result = trainer.evaluate(eval_loader)
        if trainer.cfg.objective == "vlbert":  # no alignment in VL-BERT's objective: nothing to report of it
            result = {k: v for k, v in result.items() if not k.startswith("align_")}
        if trainer.dist.is_main:
            (Path(out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            if not result.get("samples"):
                click.echo(f"warning: {eval_shards}: no usable held-out sample (skipped: "
                           f"{eval_loader.error_counts()}); the held-out numbers below mean nothing", err=True)
            click.echo("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if trainer.dist.is_main:
        click.echo(f"run directory: {out} (checkpoints/, metrics.csv, tensorboard/, loss_curves.png)")


def main(argv=None):
    """As every CLI's: with argv, returns the result (a mistake raises click's exception); without,
    reads sys.argv and exits with the status."""
    try:
        return cli.main(args=argv, prog_name="vilbert-train", standalone_mode=argv is None)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
