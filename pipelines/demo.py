"""`vilbert-demo`: the whole pipeline on the bundled sample corpus (data/sample/), on a fresh machine.

    images ──vilbert-extract──▶ shards ──vilbert-train──▶ checkpoint ──vilbert-eval──▶ results

1. `vilbert-extract` (tiny detector config by default, random init unless --weights, ground-truth
   boxes so every region is one drawn object) on the training and the held-out scenes;
2. `vilbert-train` (vilbert-tiny preset, or with `--arch vlbert` vlbert-tiny and VL-BERT's objective)
   on the training scenes, with a held-out pass;
3. `vilbert-eval --task retrieval` zero-shot (alignment head; ViLBERT only: VL-BERT's objective has
   no image-caption alignment) on the held-out scenes, and
   `vilbert-eval --task refcoco+` (refer head fine-tuned on the training scenes' expressions,
   evaluated on the held-out scenes' expressions, with grounding pictures); the same two
   evaluations of an untrained model of the same shape as a control (`--no-control` skips them);
4. a summary (OUT/summary.json too) with the measured numbers, chance levels and where everything is.

Each stage runs as its own process with the exact command printed, so any stage can be re-run by
hand. `--train-scenes/--test-scenes/--steps/--refer-steps` shorten the run (the CI test does).
`--in-memory` runs the older learning proof instead (pipelines/synthetic/learning.py, no files needed).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import click

from common.options import FiniteFloat
from common.outputs import writable_folder

from .demo_data import MARKER, check_demo_folders, feature_dim, prepare_data
from .demo_stages import REPO, Stages

SAMPLE = REPO / "data" / "sample"


def run_pipeline(out: Path, sample: Path, config: str, weights: Path | None, train_scenes: int | None,
                 test_scenes: int | None, steps: int, batch_size: int, lr: float, refer_steps: int,
                 device: str, threads: int | None, visualize: int, control: bool, seed: int,
                 arch: str = "vilbert") -> dict:
    t_start = time.perf_counter()
    try:
        writable_folder(out, "--out")
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    check_demo_folders(out, sample)  # before anything is deleted
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by vilbert-demo, which replaces its own outputs here on every run\n")
    for stale in ("shards", "train", "eval", "summary.json", "demo.log"):
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    stages = Stages(out / "demo.log", threads)
    data = out / "data"
    counts = prepare_data(sample, data, train_scenes, test_scenes)
    click.echo(f"data: {counts['train']} training + {counts['test']} held-out scenes, {counts['objects']} objects "
               f"({data}, from {sample})")
    vocab = data / "vocab.txt"

    # 1. extraction ------------------------------------------------------------------------------
    shards = out / "shards"
    common = ["--config", config, "--gt-boxes", data / "annotations.json", "--captions", data / "captions.tsv",
              "--workers", 0, "--batch-size", 16, "--quiet", "--seed", seed]
    if weights:
        common += ["--weights", weights]
    else:
        click.secho("\n!! no --weights: the detector is RANDOMLY INITIALISED (seeded). Its region features are "
                    "random\n!! projections of the pixels inside each ground-truth box, not Visual Genome "
                    "features.", fg="red", bold=True)
    if device != "auto":
        common += ["--device", device]
    stages.run("extract: training scenes", "vilbert-extract",
               [data / "images" / "train", shards / "train", *common, "--prefix", "train"])
    stages.run("extract: held-out scenes", "vilbert-extract",
               [data / "images" / "test", shards / "test", *common, "--prefix", "test", "--preview", visualize])
    # the referring task looks up both splits' images in one folder: link both shard files there
    both = shards / "all"
    both.mkdir()
    for split in ("train", "test"):
        for tar in sorted((shards / split).glob(f"{split}-*.tar")):
            try:
                (both / tar.name).symlink_to(os.path.relpath(tar, both))
            except OSError:
                shutil.copyfile(tar, both / tar.name)
    dim = feature_dim(shards / "train")

    # 2. pretraining -----------------------------------------------------------------------------
    run_dir = out / "train"
    no_dropout = ["hidden_dropout_prob=0", "attention_probs_dropout_prob=0", "v_hidden_dropout_prob=0",
                  "v_attention_probs_dropout_prob=0"]
    preset = f"{arch}-tiny"
    train_args = [shards / "train", "--out", run_dir, "--preset", preset, "--tokenizer", vocab,
                  "--set", f"v_feature_size={dim}", *[x for s in no_dropout for x in ("--set", s)],
                  "--max-steps", steps, "--batch-size", batch_size, "--micro-batch-size", batch_size,
                  "--lr", lr, "--workers", 0, "--log-every", max(1, min(50, steps // 10)),
                  "--save-every", steps, "--eval-shards", shards / "test", "--seed", seed, "--device", device]
    stages.run(f"train: {preset} on the training scenes", "vilbert-train", train_args)
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]

    # 3. evaluation ------------------------------------------------------------------------------
    eval_device = device if device != "auto" else ("cuda" if _cuda() else "cpu")
    retrieval_out = out / "eval" / "retrieval"
    zero_shot = arch == "vilbert"  # VL-BERT is not pretrained to tell a caption's image from another
    if zero_shot:
        stages.run("eval: zero-shot retrieval on the held-out scenes", "vilbert-eval",
                   ["--task", "retrieval", "--data", data / "retrieval", "--features", shards / "test",
                    "--checkpoint", checkpoint, "--tokenizer", vocab, "--train-steps", 0, "--out", retrieval_out,
                    "--device", eval_device, "--no-save"])
    refer_out = out / "eval" / "refer"
    tuned = f"refer head fine-tuned on training scenes, {refer_steps} steps" if refer_steps else "refer head untrained"
    stages.run(f"eval: referring expressions ({tuned})", "vilbert-eval",
               ["--task", "refcoco+", "--data", data / "refer", "--features", both, "--checkpoint", checkpoint,
                "--tokenizer", vocab, "--train-steps", refer_steps, "--lr", 1e-3, "--batch-size", 32,
                "--split", "val", "--out", refer_out, "--visualize", visualize, "--images", data / "images" / "test",
                "--device", eval_device, "--seed", seed, "--no-save"])

    controls = {}
    if control:  # the same evaluations from an untrained model of the same shape: what pretraining adds
        config_json = out / "eval" / "untrained-config.json"
        config_json.write_text(json.dumps(json.loads((checkpoint / "config.json").read_text())["config"]))
        untrained = ["--init-preset", config_json, "--tokenizer", vocab, "--device", eval_device, "--no-save"]
        if zero_shot:
            stages.run("control: zero-shot retrieval, untrained model", "vilbert-eval",
                       ["--task", "retrieval", "--data", data / "retrieval", "--features", shards / "test",
                        "--train-steps", 0, "--out", out / "eval" / "control-retrieval", *untrained])
        stages.run("control: referring expressions, untrained model + the same fine-tuning", "vilbert-eval",
                   ["--task", "refcoco+", "--data", data / "refer", "--features", both, "--train-steps", refer_steps,
                    "--lr", 1e-3, "--batch-size", 32, "--split", "val", "--out", out / "eval" / "control-refer",
                    "--seed", seed, *untrained])
        controls = {"refer": json.loads((out / "eval" / "control-refer" / "results.json").read_text())["splits"]["val"]}
        if zero_shot:
            controls["retrieval"] = json.loads(
                (out / "eval" / "control-retrieval" / "results.json").read_text())["splits"]["test"]

    # 4. summary -----------------------------------------------------------------------------------
    held_out = json.loads((run_dir / "eval.json").read_text())
    retrieval = json.loads((retrieval_out / "results.json").read_text())["splits"]["test"] if zero_shot else None
    refer = json.loads((refer_out / "results.json").read_text())
    n_test = counts["test"]
    summary = {
        "arch": arch,
        "data": counts, "detector": {"config": config, "weights": str(weights) if weights else "random-init"},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "held_out": held_out},
        "retrieval": retrieval,
        "refer": refer["splits"]["val"],
        "untrained_control": controls,
        "chance": ({"alignment": 0.5, "retrieval_r1_text_to_image": 1 / n_test, "refer": 1 / 3} if zero_shot
                   else {"refer": 1 / 4}),  # VL-BERT: no alignment; the whole image is a referring candidate too
        "seconds": {**stages.timings, "total": round(time.perf_counter() - t_start, 1)},
        "paths": {
            "data": str(data), "shards": str(shards),
            "box_previews": str(shards / "test" / "preview") if visualize else None,
            "checkpoint": str(checkpoint), "metrics": str(run_dir / "metrics.csv"),
            "tensorboard": str(run_dir / "tensorboard"), "loss_curves": str(run_dir / "loss_curves.png"),
            "retrieval": str(retrieval_out) if zero_shot else None, "refer": str(refer_out),
            "grounding_pictures": str(refer_out / "visualize" / "val") if visualize else None,
            "log": str(out / "demo.log"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def print_summary(s: dict) -> None:
    ho, rt, rf, ch, p = s["train"]["held_out"], s["retrieval"], s["refer"], s["chance"], s["paths"]
    click.secho(f"\n== summary ({s['seconds']['total']:.0f} s)", bold=True)
    click.echo(f"held-out scenes: {s['data']['test']} (never seen in training); model: {s['arch']}-tiny; "
               f"detector: {s['detector']['config']}, {s['detector']['weights']}")
    ctl = s.get("untrained_control") or {}
    ctl_rt, ctl_rf = ctl.get("retrieval") or {}, ctl.get("refer") or {}
    rows = [("masked-word accuracy", ho.get("mlm_accuracy"), None, None)]
    if rt:  # ViLBERT: alignment and zero-shot retrieval
        rows = [("alignment accuracy (caption matches image?)", ho.get("align_accuracy"), None, ch["alignment"]),
                *rows,
                ("zero-shot retrieval R@1, text->image", rt["t2i_R@1"], ctl_rt.get("t2i_R@1"),
                 ch["retrieval_r1_text_to_image"]),
                ("zero-shot retrieval R@5, text->image", rt["t2i_R@5"], ctl_rt.get("t2i_R@5"),
                 min(1.0, 5 * ch["retrieval_r1_text_to_image"])),
                ("zero-shot retrieval R@1, image->text", rt["i2t_R@1"], ctl_rt.get("i2t_R@1"), None)]
    else:  # VL-BERT: masked RoI classification instead of alignment
        rows.append(("masked-RoI classification accuracy", ho.get("mrc_accuracy"), None, None))
    rows.append(("referring expressions, accuracy", rf.get("accuracy"), ctl_rf.get("accuracy"), ch["refer"]))
    click.echo(f"  {'':44s} {'trained':>7s}  {'untrained' if ctl else '':>9s}  chance")
    for name, value, base, chance in rows:
        v = f"{value:7.1%}" if value is not None else f"{'-':>7s}"
        b = f"{base:9.1%}" if base is not None else " " * 9
        c = f"{chance:.1%}" if chance is not None else ""
        click.echo(f"  {name:44s} {v}  {b}  {c}")
    click.echo("where things are:")
    for label, key in (("shards", "shards"), ("box previews", "box_previews"), ("checkpoint", "checkpoint"),
                       ("TensorBoard logs", "tensorboard"), ("loss curves", "loss_curves"),
                       ("metrics", "metrics"), ("retrieval results", "retrieval"), ("refer results", "refer"),
                       ("grounding pictures", "grounding_pictures"), ("full log", "log")):
        if p[key]:
            click.echo(f"  {label:20s} {p[key]}")
    click.echo(f"  {'summary':20s} {Path(p['log']).parent / 'summary.json'}")


# ---- the CLI --------------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), help="output directory")
@click.option("--data", "sample", type=click.Path(path_type=Path), default=SAMPLE,
              show_default="data/sample in the repository", help="sample corpus (make_sample.py layout)")
@click.option("--config", type=click.Choice(["tiny", "r101"]), default="tiny",
              help="detector architecture (r101 is ~0.2 images/s on a 2-core CPU: use a GPU)")
@click.option("--weights", type=click.Path(path_type=Path, exists=True), default=None,
              help="detector weights (.pkl / .bin, r101 config); default: random init")
@click.option("--train-scenes", type=click.IntRange(min=1), default=None,
              help="use the first N training scenes (default all)")
@click.option("--test-scenes", type=click.IntRange(min=1), default=None,
              help="use the first N held-out scenes (default all)")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="pretraining steps")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="pretraining batch")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=2e-3, help="pretraining peak learning rate")
@click.option("--refer-steps", type=click.IntRange(min=0), default=300, help="fine-tuning steps of the referring task")
@click.option("--device", default="auto", help="auto (cuda when available), cpu, cuda")
@click.option("--threads", type=click.IntRange(min=0), default=1,
              help="CPU threads per stage (1 is fastest for the tiny model); 0 = torch default")
@click.option("--visualize", type=click.IntRange(min=0), default=8, help="box previews and grounding pictures to draw")
@click.option("--control/--no-control", default=True,
              help="also evaluate an untrained model of the same shape (what pretraining adds)")
@click.option("--arch", type=click.Choice(["vilbert", "vlbert"]), default="vilbert",
              help="the model: ViLBERT (two streams, its objectives) or VL-BERT (one stream, its objectives)")
@click.option("--seed", type=int, default=0)
@click.option("--in-memory", is_flag=True,
              help="instead: the in-memory learning proof (tiny ViLBERT vs no co-attention)")
def cli(out, sample, config, weights, train_scenes, test_scenes, steps, batch_size, lr, refer_steps, device, threads,
        visualize, control, arch, seed, in_memory):
    """Run the whole pipeline on the bundled sample scenes: extract -> train -> eval -> summary."""
    if in_memory:
        return in_memory_demo(out, steps, seed)
    return run_pipeline(out, sample, config, weights, train_scenes, test_scenes, steps, batch_size, lr, refer_steps,
                        device, threads or None, visualize, control, seed, arch)


def in_memory_demo(out: Path, steps: int, seed: int) -> dict:
    """The tiny ViLBERT and a copy without co-attention on pipelines/synthetic/scenes.py's scenes, in parallel."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from pipelines.synthetic.learning import train_and_evaluate

    click.echo(f"training vilbert-tiny and a copy without co-attention, {steps} steps each, in parallel ...")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        full = pool.submit(train_and_evaluate, True, steps, seed, 2e-3, str(out / "checkpoint"))
        ablation = pool.submit(train_and_evaluate, False, steps, seed)
        results = {"vilbert-tiny": full.result(), "no co-attention": ablation.result()}
    click.echo("\nheld-out scenes (chance: alignment 50%, masked colour 25%)")
    for name, r in results.items():
        click.echo(f"  {name:16s} loss {r['first_loss']:.2f} -> {r['last_loss']:.2f} in {r['seconds']:.0f}s   "
                   f"alignment {r['align_accuracy']:6.1%}   masked colour {r['mlm_accuracy']:6.1%}")
    click.echo(f"checkpoint: {out / 'checkpoint'}  (load with vilbert.load_pretrained)")
    return results


def main(argv=None):
    """As every CLI's: with argv, returns the result (a mistake raises click's exception); without,
    reads sys.argv and exits with the status."""
    return cli.main(args=argv, prog_name="vilbert-demo", standalone_mode=argv is None)
