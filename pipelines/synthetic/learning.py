"""The in-memory learning proof: a tiny ViLBERT / VL-BERT trained on fresh `SyntheticTask` batches
with the pretraining optimizer and schedule, then scored on held-out scenes (`vilbert-demo
--in-memory`, tests/train/test_learning.py)."""
from __future__ import annotations

import time

import numpy as np
import torch

from pipelines.train.optim import build_optimizer, build_scheduler
from vilbert import ViLBert, load_preset, save_pretrained

from .scenes import SyntheticTask


def fit(model: torch.nn.Module, task: SyntheticTask, steps: int, lr: float = 2e-3, batch_size: int = 64,
        seed: int = 1, objective: str = "vilbert", no_image: bool = False) -> list[float]:
    """A minimal loop with the pretraining optimizer and schedule on fresh synthetic batches; returns losses.
    objective "vlbert": VL-BERT's batches and losses (SyntheticTask.batch(vlbert=True))."""
    rng = np.random.default_rng(seed)
    opt = build_optimizer(model, lr, weight_decay=0.01)
    sched = build_scheduler(opt, steps, warmup=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        if objective == "vlbert":
            out = model(**task.batch(batch_size, rng, vlbert=True, no_image=no_image), objective="vlbert")
        else:
            out = model(**task.batch(batch_size, rng))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    return losses


def tiny_model(task: SyntheticTask, coattention: bool = True, seed: int = 0, arch: str = "vilbert"):
    """The tiny preset sized for the synthetic task, without dropout."""
    torch.manual_seed(seed)
    cfg = load_preset(
        f"{arch}-tiny", vocab_size=task.vocab_size, v_feature_size=task.feature_size,
        v_target_size=task.num_classes, max_position_embeddings=16, with_coattention=coattention,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0,
    )
    return ViLBert(cfg)


def train_and_evaluate(coattention: bool = True, steps: int = 2000, seed: int = 0, lr: float = 2e-3,
                       save_to: str | None = None, arch: str = "vilbert") -> dict:
    """Train a tiny model on the synthetic task (one thread) and evaluate it on held-out scenes.
    A plain function of plain arguments, so that two runs can go to two processes."""
    torch.set_num_threads(1)
    task = SyntheticTask(seed=seed)
    model = tiny_model(task, coattention, seed, arch)
    t0 = time.perf_counter()
    losses = fit(model, task, steps, lr=lr, seed=seed + 1)
    result = evaluate(model, task)
    result.update(first_loss=sum(losses[:50]) / 50, last_loss=sum(losses[-50:]) / 50,
                  seconds=time.perf_counter() - t0)
    if save_to:
        save_pretrained(model, save_to, metadata={"demo": "synthetic", "steps": steps, **result})
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: SyntheticTask, n: int = 2000, seed: int = 123) -> dict[str, float]:
    """Held-out alignment accuracy (no masking) and colour-word MLM accuracy (every caption masked)."""
    model.eval()
    rng = np.random.default_rng(seed)
    b = task.batch(n, rng, mask_prob=0.0, mask_regions=0.0)
    align = (model(**b).align_logits.argmax(-1) == b["align_labels"]).float().mean().item()
    b = task.batch(n, rng, mask_prob=1.0, mask_regions=0.0)
    out = model(**b)
    mlm = (out.mlm_logits.argmax(-1) == out.mlm_labels).float().mean().item()
    return {"align_accuracy": align, "mlm_accuracy": mlm}


def train_and_evaluate_vlbert(steps: int = 1500, seed: int = 0, lr: float = 2e-3, no_image: bool = False,
                              num_objects: int = 4, batch_size: int = 64) -> dict:
    """The tiny VL-BERT trained with VL-BERT's objective (MLM with visual clues, masked-RoI
    classification) on scenes holding every shape once (`num_objects` 4), so a masked region's
    shape follows from the others and the caption; no_image: the same with every region feature
    zero (boxes kept), in training and evaluation."""
    torch.set_num_threads(1)
    task = SyntheticTask(seed=seed, num_objects=num_objects)
    model = tiny_model(task, True, seed, "vlbert")
    t0 = time.perf_counter()
    losses = fit(model, task, steps, lr=lr, batch_size=batch_size, seed=seed + 1, objective="vlbert",
                 no_image=no_image)
    result = evaluate_vlbert(model, task, no_image=no_image)
    result.update(first_loss=sum(losses[:50]) / 50, last_loss=sum(losses[-50:]) / 50,
                  seconds=time.perf_counter() - t0)
    return result


@torch.no_grad()
def evaluate_vlbert(model: torch.nn.Module, task: SyntheticTask, n: int = 2000, seed: int = 123,
                    no_image: bool = False) -> dict[str, float]:
    """Held-out masked-colour accuracy (every caption's colour masked, no region masked) and
    masked-RoI classification accuracy (one region per scene replaced by the mask vector; argmax
    against the target's argmax)."""
    model.eval()
    rng = np.random.default_rng(seed)
    b = task.batch(n, rng, mask_prob=1.0, mask_regions=0.0, vlbert=True, no_image=no_image)
    out = model(**b, objective="vlbert")
    mlm = (out.mlm_logits.argmax(-1) == out.mlm_labels).float().mean().item()
    b = task.batch(n, rng, mask_prob=0.0, mask_regions=0.5, vlbert=True, one_region=True, no_image=no_image)
    assert int(b["masked_regions"].sum()) == n  # exactly one replaced region per scene
    out = model(**b, objective="vlbert")
    mrc = (out.region_logits.argmax(-1) == out.region_targets.argmax(-1)).float().mean().item()
    return {"mlm_accuracy": mlm, "mrc_accuracy": mrc}
