"""The model library's loaders on special files (a FIFO never blocks them) and on damaged weights (a
NaN or infinite tensor is refused, naming the file, the tensor and the count)."""
import os
from functools import partial

import pytest
import torch
from fifo_watch import returns_without_blocking

from common.safe_load import regular_file
from vilbert import ViLBert, load_official_checkpoint, load_official_vlbert_checkpoint, load_pretrained, save_pretrained
from vilbert.checkpoint import check_finite
from vilbert.official import convert_official_state_dict, read_official_state_dict
from vilbert.official_vlbert import convert_official_vlbert_state_dict

from official_state import CFG, VLBERT_CFG, official_state, official_vlbert_state


def fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def one_line(error, *parts):
    assert error is not None, "no error"
    text = str(error)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text
    return text


def test_regular_file_names_the_path_and_what_it_is(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    assert regular_file(tmp_path / "a.json", "answer list") == tmp_path / "a.json"
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert regular_file(str(tmp_path / "link.json")) == tmp_path / "link.json"
    with pytest.raises(FileNotFoundError, match=r"missing.json: answer list not found"):
        regular_file(tmp_path / "missing.json", "answer list")
    with pytest.raises(ValueError, match=r"p.json: not a regular file \(a FIFO\): expected answer list"):
        regular_file(fifo(tmp_path / "p.json"), "answer list")
    with pytest.raises(ValueError, match=r"not a regular file \(a directory\)"):
        regular_file(tmp_path, "answer list")
    with pytest.raises(ValueError, match=r"not a regular file \(a character device\)"):
        regular_file("/dev/null", "checkpoint weights")


def test_no_loader_blocks_on_a_fifo(tmp_path):
    ckpt = save_pretrained(ViLBert(CFG), tmp_path / "ckpt")
    for name in ("model.safetensors", "config.json"):
        broken = tmp_path / f"ckpt_{name}"
        save_pretrained(ViLBert(CFG), broken)
        f = fifo(broken / name)
        one_line(returns_without_blocking(partial(load_pretrained, broken), [f]), str(f), "not a regular file (a FIFO)")
    p = fifo(tmp_path / "pytorch_model.bin")
    for load in (load_official_checkpoint, load_official_vlbert_checkpoint, read_official_state_dict):
        one_line(returns_without_blocking(partial(load, p), [p]), str(p), "not a regular file (a FIFO)")
    torch.save(official_state(), tmp_path / "real.bin")  # an official config JSON that is a FIFO
    config = fifo(tmp_path / "bert_config.json")
    one_line(returns_without_blocking(lambda: load_official_checkpoint(tmp_path / "real.bin", config), [config]),
             str(config), "not a regular file (a FIFO)")
    assert load_pretrained(ckpt).config == CFG  # the good one still loads


def test_nan_weights_in_our_checkpoint_are_refused_naming_file_tensor_and_count(tmp_path):
    model = ViLBert(CFG)
    with torch.no_grad():
        model.backbone.embeddings.norm.weight[:2] = float("nan")
        model.mlm_head.bias[0] = float("inf")
    save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError) as caught:
        load_pretrained(tmp_path / "ckpt")
    n = CFG.hidden_size
    one_line(caught.value, str(tmp_path / "ckpt" / "model.safetensors"), "3 weights not finite",
             "in 2 tensors:", f"backbone.embeddings.norm.weight (2 of {n})", f"mlm_head.bias (1 of {CFG.vocab_size})")
    with pytest.raises(ValueError, match=r"x: 1 weight not finite \(NaN or infinite\) in 1 tensor: b \(1 of 3\)"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan"), 2.0]), "i": torch.ones(2).long()}, "x")


def test_nan_weights_in_official_checkpoints_are_refused_naming_the_official_key(tmp_path):
    state = official_state()
    state["bert.encoder.layer.1.attention.self.key.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"src: 1 weight not finite .* bert\.encoder\.layer\.1\.attention\.self"
                                         r"\.key\.weight \(1 of \d+\)"):
        convert_official_state_dict(state, CFG, source="src")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as caught:
        load_official_checkpoint(tmp_path / "pytorch_model.bin", CFG)
    one_line(caught.value, str(tmp_path / "pytorch_model.bin"), "bert.encoder.layer.1.attention.self.key.weight")
    unused = official_state()  # a weight the official forward pass never reads may be anything
    key = next(k for k in unused if "biOutput.q_dense1.weight" in k)
    unused[key][0, 0] = float("nan")
    convert_official_state_dict(unused, CFG)

    vl = official_vlbert_state(kind="vqa")
    vl["final_mlp.2.bias"][3] = float("-inf")
    with pytest.raises(ValueError, match=r"src: 1 weight not finite .* final_mlp\.2\.bias \(1 of 11\)"):
        convert_official_vlbert_state_dict(vl, VLBERT_CFG, source="src")
    torch.save({"state_dict": {f"module.{k}": v for k, v in vl.items()}}, tmp_path / "vqa.model")
    with pytest.raises(ValueError) as caught:
        load_official_checkpoint(tmp_path / "vqa.model")
    one_line(caught.value, str(tmp_path / "vqa.model"), "final_mlp.2.bias (1 of 11)")
