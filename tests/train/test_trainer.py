"""The trainer on in-memory synthetic batches: logging, checkpoints, resume, NaN handling, DDP."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.synthetic.scenes import SyntheticTask
from pipelines.train.checkpoints import list_checkpoints, load_checkpoint
from pipelines.train.metrics import read_metrics
from pipelines.train.optim import param_groups, warmup_linear
from pipelines.train.trainer import TrainConfig, Trainer

TASK = SyntheticTask()
REPO = Path(__file__).resolve().parents[2]


def config(out, **kw):
    base = dict(out=out, preset="vilbert-tiny", batch_size=16, micro_batch_size=8, max_steps=6, lr=2e-3,
                save_every=3, log_every=2, keep_last=2, tensorboard=True,
                model_overrides=dict(vocab_size=TASK.vocab_size, v_feature_size=TASK.feature_size,
                                     v_target_size=TASK.num_classes, max_position_embeddings=16))
    base.update(kw)
    return TrainConfig(**base)


def batches(start: int = 0, size: int = 8, interrupt_at: int = -1):
    """Micro-batch k is always the same, so a resumed run sees the same data."""
    k = start
    while True:
        if k == interrupt_at:
            raise KeyboardInterrupt  # the user presses Ctrl-C
        batch = TASK.batch(size, np.random.default_rng(k))
        batch["keys"] = [f"sample-{k}-{i}" for i in range(size)]
        yield batch
        k += 1


def run(cfg):
    trainer = Trainer(cfg)
    trainer.resume()
    trainer.fit(batches(trainer.step * trainer.accumulation))
    return trainer


def test_fit_logs_and_checkpoints(tmp_path):
    t = run(config(tmp_path))
    assert t.step == 6 and t.accumulation == 2 and t.samples == 6 * 16
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003", "step-00000006"]
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(0 <= r["align_accuracy"] <= 1 and r["loss"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    model, state = load_checkpoint(tmp_path / "checkpoints" / "step-00000006")
    assert state["step"] == 6
    assert model.checkpoint_metadata["train_config"]["preset"] == "vilbert-tiny"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run(config(tmp_path, max_steps=8, save_every=2, keep_last=2, log_every=4))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000006", "step-00000008"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = run(config(tmp_path / "a", max_steps=6, save_every=6))
    first = Trainer(config(tmp_path / "b", max_steps=6, save_every=3))
    with pytest.raises(KeyboardInterrupt):
        first.fit(batches(interrupt_at=7))  # during step 4
    assert first.step == 3
    resumed = run(config(tmp_path / "b", max_steps=6, save_every=3))
    assert resumed.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    rows = read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4, 6]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A real process dies inside the second save (after writing, before the rename)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO / 'tests' / 'train')!r})
        import pipelines.train.checkpoints as ck
        calls = []
        real_replace = os.replace
        def dying_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os._exit(137)  # as abrupt as SIGKILL: no cleanup, no finally
            real_replace(src, dst)
        ck.os.replace = dying_replace
        from test_trainer import config, run
        run(config({str(tmp_path)!r}, max_steps=6, save_every=3))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000003"]
    assert list(root.glob(".tmp-step-*"))  # the half-written save is there, but not under a final name
    model, state = load_checkpoint(root / "step-00000003")
    assert state["step"] == 3
    resumed = run(config(tmp_path, max_steps=6, save_every=3))
    assert resumed.step == 6 and not list(root.glob(".tmp-step-*"))


def nan_batches():
    it = batches()
    for k, batch in enumerate(it):
        if k == 2:  # the first micro-batch of step 2
            batch["image_feat"][0, 1, 0] = float("nan")
        yield batch


def test_non_finite_loss_skips_the_update(tmp_path, caplog):
    t = Trainer(config(tmp_path, max_steps=3, save_every=100, log_every=1))
    t.fit(nan_batches())
    assert t.skipped == 1 and t.step == 3
    assert "non-finite loss at step 2" in caplog.text and "sample-2-0" in caplog.text
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_non_finite_step_is_skipped_on_the_device_and_reported_at_the_next_log(tmp_path, caplog):
    t = Trainer(config(tmp_path, max_steps=4, save_every=100, log_every=4, tensorboard=False))
    assert t._device_skip  # fused AdamW: found_inf skips the update without a host sync
    t.fit(nan_batches())
    assert t.skipped == 1 and "non-finite loss at step 2" in caplog.text and "sample-2-0" in caplog.text
    some = next(p for p in t.model.parameters() if p.requires_grad)
    assert t.optimizer.state[some]["step"].item() == 3  # 4 steps, one skipped
    assert read_metrics(tmp_path / "metrics.csv")[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_fixed_size_heads_train_exactly_like_exact_selection(tmp_path):
    runs = []
    for static in (False, True):
        t = Trainer(config(tmp_path / str(static), max_steps=3, log_every=1, static_heads=static, tensorboard=False))
        t.fit(batches())
        runs.append((t, read_metrics(tmp_path / str(static) / "metrics.csv")))
    (exact, exact_rows), (fixed, fixed_rows) = runs
    assert fixed.static_heads and not exact.static_heads
    for a, b in zip(exact_rows, fixed_rows):
        for k in ("loss", "mlm_loss", "mrm_loss", "mlm_accuracy"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
        assert b["masked_overflow"] == 0
    for (name, a), b in zip(exact.model.state_dict().items(), fixed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_step_matches_eager_in_one_graph(tmp_path):
    """torch.compile of the whole model with fixed-size heads: one graph for every batch (no graph
    break, no recompilation), and the same training as eager in fp32. Dropout is off: inductor may
    run independent random ops in another order than eager (torch 2.11 does, 2.14 does not), so
    dropout masks are not comparable between the two even with `fallback_random`."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests' compilations
    small = dict(num_hidden_layers=2, v_num_hidden_layers=1, v_biattention_id=[0], t_biattention_id=[1],
                 attention_probs_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)  # SDPA's dropout_p
    runs = []
    for compiled in (False, True):
        cfg = config(tmp_path / str(compiled), max_steps=3, log_every=1, save_every=100, tensorboard=False,
                     compile=compiled, static_heads=True)
        cfg.model_overrides.update(small)
        t = Trainer(cfg)
        for module in t.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # every other dropout, the alignment head's fixed rate included
        t.fit(batches())
        runs.append((t, read_metrics(tmp_path / str(compiled) / "metrics.csv")))
    (eager, eager_rows), (comp, comp_rows) = runs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for a, b in zip(eager_rows, comp_rows):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    for (name, a), b in zip(eager.model.state_dict().items(), comp.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_non_finite_loss_can_stop(tmp_path):
    t = Trainer(config(tmp_path, max_steps=3, nan_policy="stop"))
    with pytest.raises(FloatingPointError, match="step 2"):
        t.fit(nan_batches())


def test_param_groups_and_schedule():
    t = Trainer(config(Path("/tmp/unused-vilbert-test"), max_steps=1))
    bert = {"backbone.embeddings.word_embeddings.weight", "backbone.encoder.text_layers.0.attention.query.bias"}
    groups = {g["name"]: g for g in param_groups(t.model, 1e-4, 0.01, bert, 0.1)}
    names = {id(p): n for n, p in t.model.named_parameters()}
    in_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert in_group["bert-decay"] == {"backbone.embeddings.word_embeddings.weight"}
    assert in_group["bert-no_decay"] == {"backbone.encoder.text_layers.0.attention.query.bias"}
    assert "backbone.encoder.co_layers.0.visual_ffn.output.norm.weight" in in_group["new-no_decay"]
    assert groups["bert-decay"]["lr"] == pytest.approx(1e-5) and groups["new-decay"]["lr"] == 1e-4
    assert groups["new-no_decay"]["weight_decay"] == 0.0 and groups["new-decay"]["weight_decay"] == 0.01
    f = warmup_linear(100, 0.1)
    assert [f(0), f(9), f(10), f(55), f(100)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0])


DDP_SCRIPT = """
import os, sys, json, torch
sys.path.insert(0, {tests!r})
from test_trainer import config, batches
from pipelines.train.trainer import Trainer
rank = int(os.environ["RANK"])
t = Trainer(config({out!r}, preset={preset!r}, max_steps=4, save_every=4, log_every=2, batch_size=16,
                   micro_batch_size=4))
t.resume()
t.fit(batches(start=1000 * rank, size=4))
flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
json.dump({{"rank": rank, "world": t.dist.world_size, "accumulation": t.accumulation,
           "checksum": float(flat.double().sum()), "first": flat[:5].tolist()}},
          open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("preset, port", [("vilbert-tiny", 29531), ("vlbert-tiny", 29532)])
def test_two_process_gloo_run(tmp_path, preset, port):
    """(VL-BERT has parameters that some steps leave without a gradient: its mask and text-only embeddings.)"""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests" / "train"), out=str(tmp_path / "run"), preset=preset))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["accumulation"] == 2  # 16 = 4 per pass x 2 ranks x 2
    assert r0["checksum"] == r1["checksum"] and r0["first"] == r1["first"]  # gradients were averaged
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000004"]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["step"] for r in rows] == [2, 4]  # one writer: rank 0


def test_bucket_sizes_cover_the_count_in_few_shapes():
    from pipelines.train.trainer import bucket_size
    assert bucket_size(0, 100) == 8 and bucket_size(9, 100) == 16 and bucket_size(99, 100) == 100
    sizes = {bucket_size(n, 256 * 36) for n in range(600, 800)}  # objective 1 at batch 256: ~690 +- 50
    assert all(s % 8 == 0 for s in sizes) and len(sizes) <= 2 and max(sizes) < 900
    assert all(bucket_size(n, 9216) >= n for n in range(0, 9217, 7))


def test_profile_steps_write_a_trace(tmp_path):
    t = Trainer(config(tmp_path, max_steps=8, save_every=100, log_every=4, tensorboard=False, profile_steps=2))
    t.fit(batches())
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert "scaled_dot_product_attention" in traces[0].read_text()  # the model's attention ops were recorded
