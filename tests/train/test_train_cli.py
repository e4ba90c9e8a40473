"""`vilbert-train` end to end: shards -> train -> checkpoint -> resume -> held-out losses."""
import json
import shutil
import tarfile

import click
import numpy as np
import pytest
import torch

from pipelines.synthetic.scenes import SyntheticTask
from pipelines.synthetic.shards import write_shards, write_vocab
from pipelines.train.checkpoints import list_checkpoints
from pipelines.train.metrics import read_metrics
from pipelines.train_cli import main
from vilbert import load_pretrained

TASK = SyntheticTask(feature_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_shards(TASK, root / "train", 96, seed=0, shard_size=32)
    write_shards(TASK, root / "val", 32, seed=1, shard_size=32)
    write_vocab(root / "vocab.txt")
    return root


def args(corpus, out, *extra):
    return [str(corpus / "train"), "--out", str(out), "--preset", "vilbert-tiny",
            "--tokenizer", str(corpus / "vocab.txt"),
            "--set", "max_position_embeddings=16", "--max-seq-len", "8",
            "--batch-size", "16", "--micro-batch-size", "8", "--workers", "0", "--shuffle-buffer", "16",
            "--lr", "1e-3", "--log-every", "2", "--save-every", "3", "--seed", "0", *extra]


def test_train_resume_and_evaluate(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "6"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006"]
    model = load_pretrained(out / "checkpoints" / "step-00000006")
    meta = model.checkpoint_metadata
    assert meta["feature_recipe"]["detector"] == "synthetic-scenes"  # the recipe travels with the weights
    assert meta["train_config"]["objective"] == 1
    assert model.config.vocab_size == 15  # taken from the tokenizer when no BERT is given
    assert model.config.v_feature_size == 32  # and the feature width from the shards

    # the same command with more steps continues where the run stopped
    main(args(corpus, out, "--max-steps", "9", "--eval-shards", str(corpus / "val")))
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step-00000009"
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 9]
    assert rows[-1]["samples"] == 9 * 16
    ev = json.loads((out / "eval.json").read_text())
    assert ev["samples"] == 32 and 0 <= ev["align_accuracy"] <= 1 and ev["loss"] > 0
    text = capsys.readouterr().out
    assert "held-out:" in text and "step 9" in text
    assert (out / "loss_curves.png").is_file()

    # --resume never refuses to overwrite a run; --resume DIR continues from that checkpoint
    with pytest.raises(Exception, match="--resume never"):
        main(args(corpus, out, "--max-steps", "12", "--resume", "never"))
    other = tmp_path / "branch"
    main(args(corpus, other, "--max-steps", "8", "--resume", str(out / "checkpoints" / "step-00000006")))
    assert [p.name for p in list_checkpoints(other / "checkpoints")] == ["step-00000008"]  # 6 -> 8
    (out / "loss_curves.png").unlink()
    from pipelines.train.metrics import main as plot_main
    assert plot_main([str(out)]) == 0 and (out / "loss_curves.png").stat().st_size > 1000


def test_refuses_to_resume_on_features_of_another_recipe(corpus, tmp_path):
    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "3"))
    other = tmp_path / "other"
    write_shards(SyntheticTask(feature_size=32, seed=5), other, 32, seed=2, shard_size=32)
    with pytest.raises(Exception, match="allow-mixed-recipes"):
        main(args(corpus, out, "--max-steps", "6")[:0] + [str(other)] + args(corpus, out, "--max-steps", "6")[1:])
    # nor with another model config: one line naming the field, not a wall of state-dict keys
    with pytest.raises(click.ClickException, match="config differs.*intermediate_size: 64 in the checkpoint, 40 now"):
        main(args(corpus, out, "--max-steps", "6", "--set", "intermediate_size=40"))


def test_setup_mistakes_end_in_one_readable_error_before_training(corpus, tmp_path):
    out = tmp_path / "run"
    cases = [(("--preset", "vilbert-small"), "unknown preset 'vilbert-small'"),
             (("--set", "hiden_size=64"), r"unknown config fields: \['hiden_size'\]"),
             (("--set", "hidden_size=abc"), "hidden_size='abc': expected int"),
             (("--device", "gpu"), "'gpu': not a torch device"),
             (("--eval-shards", str(tmp_path / "nosuch")), "shard.*not found.*nosuch")]
    if not torch.cuda.is_available():
        cases.append((("--device", "cuda"), "no CUDA GPU is available"))
    for extra, message in cases:
        with pytest.raises(click.ClickException, match=message):
            main(args(corpus, out, "--max-steps", "3", *extra))
    (tmp_path / "empty").mkdir()
    with pytest.raises(click.ClickException, match="empty: directory holds no .tar shards"):
        main([str(tmp_path / "empty")] + args(corpus, out)[1:])
    assert not (out / "checkpoints").exists() or not list_checkpoints(out / "checkpoints")  # nothing trained


def _copy_shards(source, target, keep=lambda name: True):
    """The shards of `source` into `target`, without the members for which keep(name) is False."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".tar":
            shutil.copy(path, target / path.name)
            continue
        with tarfile.open(path) as src, tarfile.open(target / path.name, "w") as dst:
            for member in src.getmembers():
                if keep(member.name):
                    dst.addfile(member, src.extractfile(member))


def test_a_corrupt_first_shard_is_skipped_and_shards_without_captions_stop_with_a_reason(corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    _copy_shards(corpus / "train", broken)
    first = sorted(broken.glob("*.tar"))[0]
    first.write_bytes(b"\x00garbage" * 3000)  # the recipe and feature width are read from the next shard
    out = tmp_path / "run"
    main([str(broken)] + args(corpus, out, "--max-steps", "2")[1:])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]

    uncaptioned = tmp_path / "uncaptioned"
    _copy_shards(corpus / "train", uncaptioned, keep=lambda name: not name.endswith(".txt"))
    with pytest.raises(click.ClickException, match="none holds a usable sample.*uncaptioned [1-9]"):
        main([str(uncaptioned)] + args(corpus, tmp_path / "run2", "--max-steps", "2")[1:])
    with pytest.raises(click.ClickException, match="none holds a usable sample") as raised:  # from a worker
        main([str(uncaptioned)] + args(corpus, tmp_path / "run2", "--max-steps", "2", "--workers", "1")[1:])
    assert "Traceback" not in raised.value.message and raised.value.message.count("\n") == 0
    capsys.readouterr()
    main(args(corpus, tmp_path / "run3", "--max-steps", "1", "--eval-shards", str(uncaptioned)))
    assert "no usable held-out sample" in capsys.readouterr().err  # not silently "accuracy 0.0000"


def test_help_and_usage_errors(corpus, tmp_path, capsys):
    main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--objective", "--micro-batch-size", "--bert", "--precision", "--eval-shards",
                   "[default: 1e-4; x>0]"):
        assert option in help_text.replace("0.0001", "1e-4")
    with pytest.raises(Exception, match="--tokenizer"):
        main([str(corpus / "train"), "--out", str(tmp_path / "x")])
    with pytest.raises(Exception, match="32 wide"):
        main(args(corpus, tmp_path / "y", "--set", "v_feature_size=2048"))


@pytest.mark.extended
def test_alignment_rises_well_above_chance_on_synthetic_shards(tmp_path):
    """Negatives are other scenes' captions ("a blue star" for an image without one); about 1 in 5
    of them happens to fit the image as well, so ~90 % is the ceiling and 50 % is chance. (The longest
    test, 1,500 steps through shards: in `make test-extended`, which .ci/run runs; the in-memory proof of
    tests/train/test_learning.py stays in `make test`.)"""
    task = SyntheticTask(feature_size=64)
    write_shards(task, tmp_path / "train", 2000, seed=0, shard_size=500)
    write_shards(task, tmp_path / "val", 500, seed=1, shard_size=500)
    write_vocab(tmp_path / "vocab.txt")
    out = tmp_path / "run"
    no_dropout = [f"--set={k}=0" for k in ("hidden_dropout_prob", "attention_probs_dropout_prob",
                                           "v_hidden_dropout_prob", "v_attention_probs_dropout_prob")]
    main([str(tmp_path / "train"), "--out", str(out), "--preset", "vilbert-tiny",
          "--tokenizer", str(tmp_path / "vocab.txt"),
          *no_dropout, "--batch-size", "64", "--micro-batch-size", "64",
          "--max-steps", "1500", "--lr", "2e-3", "--workers", "1", "--log-every", "50", "--save-every", "1500",
          "--eval-shards", str(tmp_path / "val")])
    rows = read_metrics(out / "metrics.csv")
    assert rows[0]["align_accuracy"] < 0.6
    assert sum(r["align_accuracy"] for r in rows[-4:]) / 4 >= 0.65
    held_out = json.loads((out / "eval.json").read_text())
    assert held_out["align_accuracy"] >= 0.65, held_out


def test_same_seed_same_run(corpus, tmp_path):
    """Two fresh runs with the same seed (in-process data loading) train identically."""
    for name in ("a", "b"):
        main(args(corpus, tmp_path / name, "--max-steps", "4"))
    a, b = (read_metrics(tmp_path / n / "metrics.csv") for n in ("a", "b"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.slow
def test_the_cli_module_runs_under_torchrun(corpus, tmp_path):
    """The documented multi-GPU command, `torchrun ... -m pipelines.train_cli SHARDS ...`, on two gloo
    processes: one run, one writer (rank 0), one checkpoint."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "pipelines.train_cli",
                           *args(corpus, out, "--max-steps", "2", "--device", "cpu")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [2]  # logged by rank 0 alone


@pytest.mark.parametrize("option,value", [("--max-steps", "-5"), ("--batch-size", "0"), ("--micro-batch-size", "0"),
                                          ("--save-every", "0"), ("--log-every", "0"), ("--max-regions", "0"),
                                          ("--epochs", "0"), ("--lr", "-1"), ("--workers", "-1")])
def test_nonsense_numbers_are_usage_errors(corpus, tmp_path, option, value):
    with pytest.raises(click.UsageError) as raised:
        main(args(corpus, tmp_path / "run", option, value))
    assert raised.value.exit_code == 2 and f"Invalid value for '{option}'" in raised.value.format_message()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_out_that_is_a_file_or_read_only_is_one_line_before_training(corpus, tmp_path):
    import os

    (tmp_path / "file").write_text("x")
    with pytest.raises(click.ClickException, match="--out .*file: exists and is not a folder"):
        main(args(corpus, tmp_path / "file", "--max-steps", "1"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("this user can write into a read-only folder")
        with pytest.raises(click.ClickException, match="--out .*locked.*not writable"):
            main(args(corpus, locked / "run", "--max-steps", "1"))
    finally:
        locked.chmod(0o700)


class NaNScenes(SyntheticTask):
    """Scenes whose region features are all NaN (a broken extraction)."""

    def regions(self, objects, rng):
        feats, boxes, probs = super().regions(objects, rng)
        return np.full_like(feats, np.nan), boxes, probs


def test_a_run_whose_updates_were_mostly_skipped_fails_and_says_so(tmp_path, capsys):
    write_shards(NaNScenes(feature_size=32), tmp_path / "nan" / "train", 64, seed=0, shard_size=32)
    write_vocab(tmp_path / "nan" / "vocab.txt")
    with pytest.raises(click.ClickException, match="4 of 4 updates were skipped"):
        main(args(tmp_path / "nan", tmp_path / "run", "--max-steps", "4"))
    assert "skipped updates: 4 of 4 steps" in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "run" / "checkpoints")  # the run's state is still saved


def test_resume_auto_passes_a_truncated_newest_checkpoint(corpus, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "6"))
    newest = out / "checkpoints" / "step-00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut by a full disk or a copy that stopped
    with caplog.at_level(logging.WARNING):
        main(args(corpus, out, "--max-steps", "9"))
    assert "step-00000006: not a usable checkpoint" in caplog.text
    assert "resuming from the checkpoint before it" in caplog.text
    assert (out / "checkpoints" / "step-00000006.damaged").is_dir()
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step-00000009"
    rows = read_metrics(out / "metrics.csv")
    assert rows[-1]["step"] == 9 and rows[-1]["samples"] == 9 * 16  # continued from step 3, counted from there
    with pytest.raises(click.ClickException, match="step-00000006.damaged: not a usable checkpoint"):
        main(args(corpus, tmp_path / "other", "--max-steps", "8", "--resume",
                  str(out / "checkpoints" / "step-00000006.damaged")))


def test_a_foreign_recipe_met_mid_run_stops_with_one_line(corpus, tmp_path):
    from shards import RECIPE
    from shards import write_shards as write_test_shards

    folder = tmp_path / "mixed"
    write_test_shards(folder, num_shards=1, per_shard=8, recipe={**RECIPE, "detector": "other-net"},
                      feature_dim=32, num_classes=1601)
    (folder / "recipe.json").write_text(json.dumps(RECIPE))  # the folder claims another recipe than its samples
    with pytest.raises(click.ClickException) as raised:
        main([str(folder)] + args(corpus, tmp_path / "run", "--max-steps", "2", "--workers", "1")[1:])
    message = raised.value.format_message()
    assert "detector='other-net'" in message and "Traceback" not in message and "\n" not in message


def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(corpus, tmp_path, monkeypatch):
    import errno

    import pipelines.train.trainer as trainer_module

    real_save, calls = trainer_module.save_checkpoint, []

    def save_until_the_disk_fills(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **kw)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_until_the_disk_fills)
    out = tmp_path / "run"
    with pytest.raises(click.ClickException, match="the disk is full .No space left on device.; the checkpoints "
                                                    "already saved are intact; free some space and re-run"):
        main(args(corpus, out, "--max-steps", "6"))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003"]
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    main(args(corpus, out, "--max-steps", "6"))  # the same command, with space again
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006"]


def test_a_model_that_cannot_read_the_batches_is_one_line_before_training(corpus, tmp_path):
    cases = [(["--max-seq-len", "40"], "--max-seq-len 40 is longer than the model's max_position_embeddings 16"),
             (["--set", "v_target_size=7"], "class distributions are 1601 wide, the model predicts 7"),
             (["--set", "vocab_size=5"], "--tokenizer has 15 tokens, the model reads 5")]
    for extra, message in cases:
        with pytest.raises(click.ClickException, match=message):
            main(args(corpus, tmp_path / "run", "--max-steps", "1", *extra))
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_eval_shards_of_another_width_are_one_line_before_training(corpus, tmp_path):
    """--eval-shards of other features were found only after training (every held-out sample skipped)."""
    write_shards(SyntheticTask(feature_size=16), tmp_path / "narrow", 16, seed=2, shard_size=16)
    write_shards(TASK, tmp_path / "few_classes", 16, seed=2, shard_size=16, num_classes=5)
    cases = [("narrow", "region features 16 wide and class distributions 1601"),
             ("few_classes", "region features 32 wide and class distributions 5")]
    for folder, said in cases:
        out = tmp_path / f"run_{folder}"
        with pytest.raises(click.ClickException, match=rf"^--eval-shards: .*{folder}/synthetic-000000.tar: {said}, "
                                                       r"but the training shards' \(.*train.*\) are 32 and 1601"):
            main(args(corpus, out, "--max-steps", "3", "--eval-shards", str(tmp_path / folder)))
        assert not (out / "checkpoints").exists() or not list_checkpoints(out / "checkpoints")  # nothing trained


def test_eval_shards_of_another_recipe_with_the_same_widths_are_refused_before_training(corpus, tmp_path):
    other = tmp_path / "other"
    write_shards(SyntheticTask(feature_size=32, seed=5), other, 16, seed=2, shard_size=16)  # 32 and 1601 wide too
    with pytest.raises(click.ClickException, match=rf"^--eval-shards: {other}: feature recipe .*, but the training "
                                                   r"shards' is .*: evaluate on features made the same way") as e:
        main(args(corpus, tmp_path / "run", "--max-steps", "3", "--eval-shards", str(other)))
    assert "\n" not in e.value.message and not (tmp_path / "run" / "checkpoints").exists()
    main(args(corpus, tmp_path / "mixed", "--max-steps", "2", "--eval-shards", str(other), "--allow-mixed-recipes"))
    assert json.loads((tmp_path / "mixed" / "eval.json").read_text())["samples"] > 0


@pytest.mark.parametrize("count", [-3, 2.5, "32", None])
def test_a_sizes_json_count_that_is_not_a_whole_number_is_one_line_naming_the_file(corpus, tmp_path, count):
    shutil.copytree(corpus / "train", tmp_path / "train")
    sizes = json.loads((tmp_path / "train" / "sizes.json").read_text())
    sizes[sorted(sizes)[0]] = count
    (tmp_path / "train" / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(click.ClickException, match=rf"^{tmp_path / 'train' / 'sizes.json'}: 'synthetic-000000.tar' "
                                                   rf"has the sample count {count!r}, expected a whole number >= 0$"):
        main([str(tmp_path / "train")] + args(corpus, tmp_path / "run", "--max-steps", "2")[1:])


def test_a_batch_smaller_than_the_micro_batch_is_a_usage_error(corpus, tmp_path, capsys):
    with pytest.raises(click.UsageError, match="--batch-size 4 is smaller than --micro-batch-size 8"):
        main(args(corpus, tmp_path / "run", "--max-steps", "2", "--batch-size", "4"))
    assert not (tmp_path / "run").exists()


def test_a_batch_that_is_not_a_multiple_of_the_micro_batch_is_one_line_before_training(corpus, tmp_path):
    """It trained on round(batch / micro) micro-batches a step without a word: 12 asked, 16 taken."""
    with pytest.raises(click.ClickException, match=r"^--batch-size 12 is not a multiple of --micro-batch-size 8 x 1 "
                                                   r"process\(es\) = 8: give --batch-size 8 or 16") as e:
        main(args(corpus, tmp_path / "run", "--max-steps", "2", "--batch-size", "12"))
    assert "\n" not in e.value.message
    assert not (tmp_path / "run" / "checkpoints").exists() or not list_checkpoints(tmp_path / "run" / "checkpoints")
