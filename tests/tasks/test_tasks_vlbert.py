"""vilbert-eval with a VL-BERT: its own task heads and inputs (jackroos/VL-BERT's vqa, refcoco and vcr
modules) on the synthetic task data, and fine-tuning on the referring task against the untrained model."""
import json

import numpy as np
import pytest
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.refcoco import RefCOCOTask
from pipelines.tasks.text import encode_with_mask_slot, load_tokenizer
from pipelines.tasks.vqa import VQATask
from vilbert import ViLBert, load_preset, load_pretrained, save_pretrained

from tasks_data import make_refer, make_vcr, make_vqa, run_cli, vocab_size, write_vocab


def vlbert_checkpoint(folder, seed=0):
    torch.manual_seed(seed)
    config = load_preset("vlbert-tiny", vocab_size=vocab_size(), v_feature_size=32, v_target_size=5,
                         max_position_embeddings=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return save_pretrained(ViLBert(config), folder, {"note": "tiny VL-BERT test model"})


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlbert_refer")
    return {"root": root, "data": make_refer(root), "vocab": write_vocab(root), "ckpt": vlbert_checkpoint(root / "m")}


def test_mask_slot_input_is_question_mask_sep_with_the_answer_segment(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path))
    enc = encode_with_mask_slot(tok, ["what colour is the circle?", "what colour"], max_length=7)
    cls, sep, mask, pad = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id
    what, colour = tok.convert_tokens_to_ids(["what", "colour"])
    assert enc["input_ids"][1].tolist() == [cls, what, colour, sep, mask, sep, pad]
    assert enc["input_ids"][0, :3].tolist() == [cls, what, colour] and len(enc["input_ids"][0]) == 7  # cut to fit
    assert enc["input_ids"][0, -2:].tolist() == [mask, sep]
    assert enc["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 0]]
    assert enc["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert enc["mask_position"].tolist() == [5, 4]
    assert (enc["input_ids"][torch.arange(2), enc["mask_position"]] == mask).all()


def test_vqa_on_vlbert_reads_the_mask_after_the_question(tmp_path):
    root = tmp_path / "vqa"
    data = make_vqa(root)
    d = {"root": root, "data": data, "vocab": write_vocab(root)}
    ckpt = vlbert_checkpoint(tmp_path / "m")
    opts = TaskOptions(data=data, features=root / "features", out=tmp_path / "o", tokenizer=d["vocab"],
                       batch_size=4, extra={"min_answer_count": 1})
    task = VQATask(opts)
    model = load_pretrained(ckpt)
    task.prepare(model)
    assert model.task_heads.spec["vqa"] == ("masked_answer", 4)
    batch = task.train_batch(np.random.default_rng(0))
    mask_id = task.tokenizer.mask_token_id
    assert (batch["input_ids"][torch.arange(4), batch["mask_position"]] == mask_id).all()
    assert task.loss(model, batch).isfinite()

    out = tmp_path / "run"
    assert run_cli("vqa", d, out, "--checkpoint", str(ckpt), "--min-answer-count", "1", "--train-steps", "30",
                   "--lr", "1e-3", "--batch-size", "16") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_loss_last"] < results["train_loss_first"]
    assert load_pretrained(out / "finetuned").task_heads.spec["vqa"] == ("masked_answer", 4)
    preds = json.loads((out / "predictions_val.json").read_text())
    assert len(preds) == 24 and {p["answer"] for p in preds} <= {"red", "green", "blue", "yellow"}


def test_refer_on_vlbert_scores_the_whole_image_box_too(refer, tmp_path):
    opts = TaskOptions(data=refer["data"], features=refer["root"] / "features", out=tmp_path, tokenizer=refer["vocab"],
                       batch_size=8, extra={"gt_features": refer["root"] / "gt_features"})
    task = RefCOCOTask(opts)
    model = load_pretrained(refer["ckpt"])
    task.prepare(model)
    assert model.task_heads.spec["refer"] == ("region_mlp", 1) and task.iou_rule == "vl-bert"
    b = task.train_batch(np.random.default_rng(0))
    assert b["image_feat"].shape == (8, 1 + 5 + 4, 32)
    assert (b["boxes"][:, 0] == torch.tensor([0, 0, 99, 99])).all()  # the whole image (100 px), [0, 0, W - 1, H - 1]
    # official labels: 1 where IoU (end pixels counted) > 0.5, over every box; the jittered detection and
    # the gt box of the referred object
    assert set(b["targets"].unique().tolist()) == {0.0, 1.0} and (b["targets"].sum(1) == 2).all()
    assert task.candidates(b)[:, 0].all()  # the whole image can be picked
    logits = task.region_logits(model, b)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, b["targets"], reduction="none")
    torch.testing.assert_close(task.loss(model, b), bce[b["image_mask"].bool()].mean())  # mean over real boxes


def test_finetuning_vlbert_on_referring_beats_the_untrained_model(refer, tmp_path):
    out = tmp_path / "out"
    assert run_cli("refcoco+", refer, out, "--checkpoint", str(refer["ckpt"]), "--gt-boxes",
                   str(refer["root"] / "gt_features"), "--train-steps", "150", "--lr", "1e-3", "--batch-size", "32",
                   "--split", "val", "--split", "testA") == 0
    tuned = json.loads((out / "results.json").read_text())["splits"]
    untrained_out = tmp_path / "untrained"
    assert run_cli("refcoco+", refer, untrained_out, "--checkpoint", str(refer["ckpt"]), "--split", "val",
                   "--split", "testA") == 0
    untrained = json.loads((untrained_out / "results.json").read_text())["splits"]
    for split in ("val", "testA"):  # 6 candidates (the whole image, 4 objects, the background), one right
        assert untrained[split]["accuracy"] <= 0.4, untrained
        assert tuned[split]["accuracy"] >= 0.8 and tuned[split]["accuracy"] >= untrained[split]["accuracy"] + 0.45, \
            (tuned, untrained)
    preds = json.loads((out / "predictions_val.json").read_text())
    assert all(p["hit"] == (p["iou"] >= 0.5) for p in preds)  # the vl-bert rule: >= 0.5


def test_vcr_on_vlbert_scores_each_choice_from_cls(tmp_path):
    root = tmp_path / "vcr"
    data = make_vcr(root, n_questions=(16, 8))
    d = {"root": root, "data": data, "vocab": write_vocab(root, extra=[])}
    ckpt = vlbert_checkpoint(tmp_path / "m")
    # VL-BERT's own text; with --gt-boxes its regions are the whole image and the objects' boxes, and a
    # word naming an object carries that object's region; without, the detections and the whole image
    for name, gt in (("run", []), ("grounded", ["--gt-boxes", str(root / "gt_features")])):
        out = tmp_path / name
        assert run_cli("vcr", d, out, "--checkpoint", str(ckpt), "--train-steps", "2", "--batch-size", "4", *gt) == 0
        assert load_pretrained(out / "finetuned").task_heads.spec == {"vcr": ("cls_linear", 1)}
        metrics = json.loads((out / "results.json").read_text())["splits"]["val"]
        assert metrics["scored"] == 8 and 0 <= metrics["q2ar"] <= metrics["q2a"] <= 1
