"""Proof that the model learns a task that needs both streams (CPU, tiny preset)."""
import pytest
import torch

from pipelines.synthetic import SyntheticTask, evaluate, fit
from vilbert import ViLBert, load_preset


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    yield
    torch.set_num_threads(n)


def train(task, steps, **overrides):
    torch.manual_seed(0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)
    cfg = load_preset("vilbert-tiny", vocab_size=task.vocab_size, v_feature_size=task.feature_size,
                      v_target_size=task.num_classes, max_position_embeddings=16, **no_dropout, **overrides)
    model = ViLBert(cfg)
    losses = fit(model, task, steps)
    return model, losses


@pytest.mark.slow
def test_coattention_learns_what_text_alone_cannot(one_thread):
    task = SyntheticTask()
    full, losses = train(task, 1200)
    ablation, _ = train(task, 1200, with_coattention=False)
    got, base = evaluate(full, task), evaluate(ablation, task)
    print("full", got, "text-only ablation", base)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 1.0
    assert got["align_accuracy"] >= 0.90
    assert got["mlm_accuracy"] >= 0.90
    # without co-attention the caption's colour cannot be checked against the image: chance level
    assert base["align_accuracy"] <= 0.60 and base["mlm_accuracy"] <= 0.40
    assert got["align_accuracy"] - base["align_accuracy"] >= 0.30
    assert got["mlm_accuracy"] - base["mlm_accuracy"] >= 0.50
