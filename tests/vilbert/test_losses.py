"""Pretraining losses against hand computations."""
import math

import torch

from vilbert import IGNORE_INDEX, ViLBert, load_preset
from vilbert.heads import masked_region_loss


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    cfg = load_preset("vilbert-tiny", vocab_size=40, v_feature_size=10, v_target_size=6)
    model = ViLBert(cfg).eval()
    B, T, R = 4, 5, 4
    batch = dict(
        input_ids=torch.randint(1, 40, (B, T)),
        image_feat=torch.randn(B, R, 10),
        image_loc=torch.rand(B, R, 5),
        lm_labels=torch.full((B, T), IGNORE_INDEX),
        region_labels=torch.zeros(B, R, dtype=torch.long),
        region_targets=torch.softmax(torch.randn(B, R, 6), -1),
        align_labels=torch.tensor([0, 1, 0, 1]),
    )
    return model, batch


def test_kl_matches_hand_computation_with_zero_targets():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    target = torch.tensor([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]])
    expected = 0.0
    for row, t in zip(logits, target):
        p = torch.softmax(row, -1)
        expected += sum(float(tc) * (math.log(tc) - math.log(pc)) for tc, pc in zip(t.tolist(), p.tolist()) if tc > 0)
    expected /= 2
    assert abs(masked_region_loss(logits, target).item() - expected) < 1e-6


def test_losses_equal_hand_computation_on_full_logits():
    model, b = model_and_batch()
    b["lm_labels"][0, 2] = 7
    b["lm_labels"][2, 1] = 3
    b["region_labels"][0, 1] = 1
    b["region_labels"][2, 3] = 1
    with torch.no_grad():
        full = model(**{k: b[k] for k in ("input_ids", "image_feat", "image_loc")})
        out = model(**b)
    ce = -(torch.log_softmax(full.mlm_logits[0, 2], -1)[7] + torch.log_softmax(full.mlm_logits[2, 1], -1)[3]) / 2
    assert torch.allclose(out.mlm_loss, ce, atol=1e-5)
    kl = 0
    for i, r in [(0, 1), (2, 3)]:
        t = b["region_targets"][i, r]
        kl = kl + (t * (t.log() - torch.log_softmax(full.region_logits[i, r], -1))).sum()
    assert torch.allclose(out.mrm_loss, kl / 2, atol=1e-5)
    align = torch.nn.functional.cross_entropy(full.align_logits, b["align_labels"])
    assert torch.allclose(out.align_loss, align, atol=1e-6)
    assert torch.allclose(out.loss, ce + kl / 2 + align, atol=1e-5)
    # the heads ran only at the two masked tokens / regions, and gave the same logits there
    assert out.mlm_logits.shape == (2, 40) and out.region_logits.shape == (2, 6)
    torch.testing.assert_close(out.mlm_logits[0], full.mlm_logits[0, 2])


def test_masked_losses_on_mismatched_pairs_follow_the_option():
    model, b = model_and_batch()
    b["lm_labels"][1, 2] = 7  # sample 1 has a mismatched caption
    b["region_labels"][1, 2] = 1
    with torch.no_grad():
        skipped = model(**b)  # objective 1 (default): not counted
        counted = model(**b, mask_loss_on_mismatch=True)  # objective 0: counted
    assert skipped.mlm_loss.item() == 0.0 and skipped.mrm_loss.item() == 0.0
    assert skipped.mlm_logits.shape[0] == 0
    assert counted.mlm_loss.item() > 0.0 and counted.mrm_loss.item() > 0.0
    assert torch.allclose(skipped.align_loss, counted.align_loss)


def test_batch_without_masked_regions_is_finite_and_backpropagates():
    model, b = model_and_batch()
    model.train()
    out = model(**b)  # no masked token, no masked region
    assert out.mrm_loss.item() == 0.0 and out.mlm_loss.item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mlm_decoder_is_tied_to_word_embeddings():
    model, _ = model_and_batch()
    emb = model.backbone.embeddings.word_embeddings.weight
    assert model.mlm_head.word_embeddings.weight is emb
    assert "mlm_head.word_embeddings.weight" not in model.state_dict()
    with torch.no_grad():
        emb[5].fill_(3.0)
    x = torch.randn(2, model.config.hidden_size)
    h = model.mlm_head.transform(x)
    torch.testing.assert_close(model.mlm_head(x)[:, 5], h.sum(-1) * 3.0 + model.mlm_head.bias[5])


def _random_masks(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = b["input_ids"].shape
    R = b["image_feat"].shape[1]
    b["lm_labels"] = torch.where(torch.rand(B, T, generator=g) < 0.4, torch.randint(1, 40, (B, T), generator=g),
                                 torch.full((B, T), IGNORE_INDEX))
    b["region_labels"] = (torch.rand(B, R, generator=g) < 0.4).long()
    return b


def test_fixed_capacity_heads_equal_exact_selection_in_losses_and_gradients():
    model, b = model_and_batch()
    b = _random_masks(b)
    n_tokens = int(((b["lm_labels"] != IGNORE_INDEX) & (b["align_labels"] == 0)[:, None]).sum())
    n_regions = int(((b["region_labels"] == 1) & (b["align_labels"] == 0)[:, None]).sum())
    assert n_tokens > 1 and n_regions > 1
    grads = []
    for capacity in (None, (n_tokens + 5, n_regions + 3)):
        model.zero_grad()
        out = model(**b, masked_capacity=capacity)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if capacity is None:
            exact = out
    assert out.mlm_logits.shape[0] == n_tokens + 5 and out.region_logits.shape[0] == n_regions + 3
    assert (out.mlm_labels != IGNORE_INDEX).sum() == n_tokens  # padding rows carry IGNORE_INDEX
    torch.testing.assert_close(out.mlm_labels[:n_tokens], exact.mlm_labels)
    for name in ("loss", "mlm_loss", "mrm_loss", "align_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(exact, name), rtol=1e-6, atol=1e-6)
    assert out.overflow.item() == 0 and exact.overflow.item() == 0
    assert len(grads[0]) == len(grads[1])
    for g_exact, g_fixed in zip(*grads):
        torch.testing.assert_close(g_fixed, g_exact, rtol=1e-5, atol=1e-6)


def test_fixed_capacity_overflow_is_counted_and_losses_use_the_first_rows():
    model, b = model_and_batch()
    b = _random_masks(b)
    with torch.no_grad():
        exact = model(**b)
        small = model(**b, masked_capacity=(2, 1))
    n_tokens, n_regions = exact.mlm_logits.shape[0], exact.region_logits.shape[0]
    assert small.overflow.item() == (n_tokens - 2) + (n_regions - 1)
    ce = torch.nn.functional.cross_entropy(exact.mlm_logits[:2], exact.mlm_labels[:2])
    torch.testing.assert_close(small.mlm_loss, ce)


def test_fixed_capacity_with_no_masked_position_gives_zero_losses():
    model, b = model_and_batch()  # no masked token or region
    out = model(**b, masked_capacity=(8, 8))
    assert out.mlm_loss.item() == 0.0 and out.mrm_loss.item() == 0.0 and out.overflow.item() == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_default_capacity_covers_the_mean_plus_six_deviations():
    from vilbert.pretraining import default_capacity
    k = default_capacity(256 * 36)
    mean, sd = 256 * 36 * 0.15, (256 * 36 * 0.15 * 0.85) ** 0.5
    assert mean + 6 * sd <= k <= mean + 6 * sd + 16 and k % 8 == 0
    assert default_capacity(10) == 10  # never more than the positions


def test_compact_region_targets_equal_full_targets():
    model, b = model_and_batch()
    b = _random_masks(b, seed=3)
    full = b["region_targets"]
    compact = full[b["region_labels"] == 1]  # (M, C) row-major, negatives included
    assert 1 < len(compact) < full.shape[0] * full.shape[1]
    with torch.no_grad():
        for on_mismatch in (False, True):
            for capacity in (None, (40, 30)):
                a = model(**b, mask_loss_on_mismatch=on_mismatch, masked_capacity=capacity)
                c = model(**{**b, "region_targets": compact}, mask_loss_on_mismatch=on_mismatch,
                          masked_capacity=capacity)
                assert a.mrm_loss.item() > 0
                torch.testing.assert_close(c.mrm_loss, a.mrm_loss)
        none = model(**{**b, "region_labels": torch.zeros_like(b["region_labels"]),
                        "region_targets": compact[:0]}, masked_capacity=(8, 8))
    assert none.mrm_loss.item() == 0.0


def test_vlbert_losses_equal_hand_computation():
    """VL-BERT: word cross-entropy averaged over the masked words of caption rows and, apart, of
    text-only rows; soft cross-entropy to the class distribution averaged over the masked regions."""
    from vilbert.heads import soft_cross_entropy_loss
    from vilbert.pretraining import vlbert_pretraining_losses

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, IGNORE_INDEX])
    text_only = torch.tensor([False, True, True, False])
    region_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.8, 0.1]])

    def log_p(row, c):
        return row[c].item() - math.log(sum(math.exp(v) for v in row.tolist()))

    captions = -log_p(logits[0], 0)  # the only counted caption word
    corpus = -(log_p(logits[1], 1) + log_p(logits[2], 2)) / 2
    mrc = -sum(t * log_p(r, c) for r, row in zip(region_logits, targets) for c, t in enumerate(row.tolist())) / 2
    got = vlbert_pretraining_losses(logits, labels, text_only, region_logits, targets)
    for value, expected in [(got.mlm_captions, captions), (got.mlm_text_only, corpus), (got.mrc, mrc),
                            (got.loss, captions + corpus + mrc)]:
        assert abs(value.item() - expected) < 1e-6
    # soft cross-entropy = KL + the targets' entropy; nothing counted gives 0, not NaN
    entropy = -sum(t * math.log(t) for row in targets.tolist() for t in row if t > 0) / 2
    assert abs(soft_cross_entropy_loss(region_logits, targets).item()
               - masked_region_loss(region_logits, targets).item() - entropy) < 1e-6
    assert soft_cross_entropy_loss(region_logits, targets, torch.tensor([False, False])).item() == 0.0
    none = vlbert_pretraining_losses(logits, torch.full((4,), IGNORE_INDEX), text_only, region_logits[:0], targets[:0])
    assert none.loss.item() == 0.0
