"""Task metric code against hand-computed cases; the restricted refs unpickler; shard lookup."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pipelines.tasks import TASKS
from pipelines.tasks.base import Task
from pipelines.tasks.features import FeatureStore, locations, with_img_token
from pipelines.tasks.metrics import box_iou, hit_rate, recall_at_k, rule_iou
from pipelines.tasks.refer_pickle import UnsafePickleError, load_plain_pickle, load_refs

from tasks_data import exit_status, npy, write_shards


def test_box_iou_hand_cases():
    a = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [2, 2, 6, 6]]
    got = box_iou(a, b).diagonal()
    # identical; half overlap: 50 / (100 + 100 - 50); disjoint; 4 / (16 + 16 - 4)
    torch.testing.assert_close(got, torch.tensor([1.0, 50 / 150, 0.0, 4 / 28]))
    assert box_iou(a, b).shape == (4, 4)
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]]).item() == 0.0  # degenerate: no NaN


def test_hit_rate_counts_iou_at_least_half():
    gt = [[0, 0, 10, 10]] * 3
    pred = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9]]  # IoU 1, 0.5 exactly, 0.49
    rate, hits = hit_rate(pred, gt, "continuous")
    assert hits == [True, True, False] and rate == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        hit_rate(pred, gt[:2])
    with pytest.raises(ValueError, match="unknown IoU rule 'iou'"):
        hit_rate(pred, gt, "iou")


def test_the_referring_rules_at_their_boundaries():
    # end pixels counted: [0, 0, 9, 9] is 10 x 10 = 100 px; [0, 0, 9, 4] is 10 x 5 = 50 px inside it: IoU 0.5
    a, b = [[0, 0, 9, 4]], [[0, 0, 9, 9]]
    assert box_iou(a, b, pixel_inclusive=True).item() == 0.5
    assert box_iou(a, b).item() == pytest.approx(36 / 81)  # continuous: 9 x 4 inside 9 x 9
    assert hit_rate(a, b, "vilbert-multi-task")[1] == [False]  # IoU > 0.5 (task_utils.py)
    assert hit_rate(a, b, "vl-bert")[1] == [True]  # IoU >= 0.5 (refcoco/function/test.py)
    assert hit_rate(a, b, "refer")[1] == [False] and hit_rate(a, b, "continuous")[1] == [False]  # 0.44
    # continuously 0.49, but 11 x 5.9 of 11 x 11 = 0.536 with the end pixels counted
    a, b = [[0, 0, 10, 4.9]], [[0, 0, 10, 10]]
    assert box_iou(a, b, pixel_inclusive=True).item() == pytest.approx(64.9 / 121)
    assert [hit_rate(a, b, r)[1][0] for r in ("vilbert-multi-task", "vl-bert", "refer", "continuous")] == \
        [True, True, False, False]
    # the refer toolkit counts an intersection at most one pixel wide as none: identical 1-px-wide boxes miss
    thin = [[0, 0, 1, 10]]
    assert [hit_rate(thin, thin, r)[1][0] for r in ("vilbert-multi-task", "vl-bert", "refer", "continuous")] == \
        [True, True, False, True]
    torch.testing.assert_close(rule_iou([[0, 0, 10, 10]], [[9, 0, 19, 10]], "refer"), torch.zeros(1, 1))
    torch.testing.assert_close(rule_iou([[0, 0, 10, 10]], [[8, 0, 18, 10]], "refer"), torch.tensor([[20 / 180]]))
    # disjoint boxes stay at 0 with the +1 too (an intersection of -1 + 1 is clamped, not counted)
    assert box_iou([[0, 0, 4, 4]], [[6, 6, 9, 9]], pixel_inclusive=True).item() == 0.0
    assert box_iou([[0, 0, 4, 4]], [[4, 4, 9, 9]], pixel_inclusive=True).item() == pytest.approx(1 / (25 + 36 - 1))


def test_recall_at_k_hand_case():
    # 3 images, 4 captions; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2
    scores = torch.tensor([
        [0.9, 0.1, 0.2],  # right image ranked 1st
        [0.1, 0.5, 0.3],  # right image (0) ranked 3rd
        [0.3, 0.2, 0.1],  # right image (1) ranked 2nd
        [0.0, 0.0, 0.4],  # 1st
    ])
    gt = [0, 0, 1, 2]
    r = recall_at_k(scores, gt, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(2 / 4)
    assert r["t2i_R@2"] == pytest.approx(3 / 4)
    assert r["t2i_R@3"] == 1.0
    # image 0: column [0.9, 0.1, 0.3, 0.0], own captions 0 (rank 1) -> 1st
    # image 1: column [0.1, 0.5, 0.2, 0.0], own caption 2 is 2nd; image 2: [0.2, 0.3, 0.1, 0.4] -> 1st
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    assert r["i2t_R@2"] == 1.0
    # the official median and mean rank (1-based): text->image ranks 0, 2, 1, 0
    assert r["t2i_medr"] == 1.0 and r["t2i_meanr"] == pytest.approx(1.75)
    assert r["i2t_medr"] == 1.0 and r["i2t_meanr"] == pytest.approx(4 / 3)  # ranks 0, 1, 0


def test_recall_ties_rank_at_their_worst():
    gt = [0, 0, 1, 2]
    same = torch.full((4, 3), 0.5)  # e.g. identical image features: every image ties
    r = recall_at_k(same, gt, ks=(1, 2, 3))
    assert (r["t2i_R@1"], r["t2i_R@2"], r["t2i_R@3"]) == (0.0, 0.0, 1.0)  # each caption: 2 others tie
    # image 0 ties with the 2 captions of other images, images 1 and 2 with 3 each
    assert (r["i2t_R@1"], r["i2t_R@3"]) == (0.0, pytest.approx(1 / 3))
    one_tie = torch.tensor([[1.0, 1.0, 0.0]])  # the right image ties with one other: 2nd, not 1st
    assert recall_at_k(one_tie, [0], ks=(1, 2))["t2i_R@1"] == 0.0
    assert recall_at_k(one_tie, [0], ks=(1, 2))["t2i_R@2"] == 1.0
    # two captions of the same image tying with each other do not push each other down
    own_tie = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    assert recall_at_k(own_tie, [0, 0, 1], ks=(1,))["i2t_R@1"] == 1.0
    assert recall_at_k(torch.tensor([[0.3]]), [0], ks=(1,))["t2i_R@1"] == 1.0  # one image: trivially right


def test_recall_refuses_non_finite_and_empty_scores():
    scores = torch.rand(4, 3)
    scores[1, 2] = float("nan")
    scores[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 of 12 caption-image scores are not finite, e.g. "
                                         r"\(caption #1, image #2\), \(caption #3, image #0\)"):
        recall_at_k(scores, [0, 0, 1, 2])
    with pytest.raises(ValueError, match=r"\('a dog', 'img7'\)"):
        recall_at_k(torch.tensor([[float("nan")]]), [0], caption_names=["a dog"], image_names=["img7"])
    with pytest.raises(ValueError, match="0 captions and 3 images"):
        recall_at_k(torch.zeros(0, 3), [])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_refs_pickle_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Exploit(str(marker))}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*refused.*open"):
        load_refs(path)
    assert not marker.exists()
    import os

    path.write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_plain_pickle(path)


def test_plain_refs_pickle_loads_and_is_validated(tmp_path):
    path = tmp_path / "refs(unc).p"
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "category_id": 1, "sent_ids": [7],
             "sentences": [{"raw": "left dog", "sent_id": 7, "tokens": ["left", "dog"]}], "tags": {1, 2}}]
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs(path) == refs
    path.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref #0"):
        load_refs(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_refs(path)


def test_feature_store_lookup_by_id_and_img_token(tmp_path):
    feats = {f"COCO_val2014_{i:012d}": (np.full((3, 4), i, np.float32),
                                         np.array([[0, 0, 50, 100], [50, 0, 100, 50], [10, 10, 20, 20]], np.float32))
             for i in (7, 42)}
    feats["1000092795"] = feats.pop("COCO_val2014_000000000007")
    store = FeatureStore(write_shards(tmp_path / "f", feats, shard_size=1))
    assert len(store) == 2
    assert store.get(42).key == "COCO_val2014_000000000042"  # trailing digits of the key
    assert store.get("1000092795.jpg").key == "1000092795"
    assert 5 not in store
    with pytest.raises(KeyError, match="no features for image id 5"):
        store.get(5)
    r = store.get(42)
    f, loc = with_img_token(r.features, r.boxes, r.width, r.height)
    assert f.shape == (4, 4) and np.allclose(f[0], 42)
    np.testing.assert_allclose(loc[0], [0, 0, 1, 1, 1])
    np.testing.assert_allclose(loc[1], [0, 0, 0.5, 1, 0.5])
    np.testing.assert_allclose(locations(np.array([[10, 10, 20, 20]], np.float32), 100, 100), [[.1, .1, .2, .2, .01]])


def test_a_damaged_feature_shard_keeps_its_complete_samples_and_is_named_when_one_is_missing(tmp_path):
    from pipelines.tasks.features import check_features

    boxes = np.array([[0, 0, 10, 10]], np.float32)
    folder = write_shards(tmp_path / "f", {f"000{i}": (np.full((1, 4), i, np.float32), boxes) for i in range(6)},
                          shard_size=3)
    second = sorted(folder.glob("*.tar"))[1]
    with tarfile.open(second) as archive:
        cut = archive.getmember("0004.features.npy").offset_data + 8
    second.write_bytes(second.read_bytes()[:cut])  # 0003 whole, 0004 cut inside its features
    with pytest.warns(UserWarning, match="not a readable tar shard"):
        store = FeatureStore(folder)
    assert sorted(store.members) == ["0000", "0001", "0002", "0003"]
    assert np.allclose(store.get(3).features, 3)
    # a partial copy of a sample in a damaged shard does not hide its complete copy in another one
    first = sorted(folder.glob("*.tar"))[0]
    with tarfile.open(first) as archive:
        cut = archive.getmember("0000.features.npy").offset_data + 8
    (folder / "zz-000000.tar").write_bytes(first.read_bytes()[:cut])  # 0000's json whole, features cut
    with pytest.warns(UserWarning, match="zz-000000.tar: not a readable tar shard"):
        store = FeatureStore(folder)
    assert np.allclose(store.get(0).features, 0)
    assert all(path.name != "zz-000000.tar" for path, _, _ in store.members["0000"].values())
    with pytest.raises(KeyError, match=r"no features for 1 val images, e.g. \[4\] \(unreadable shards: .*"
                                       + second.name):
        check_features(store, [3, 4], "val")


def test_feature_store_refuses_pickled_arrays(tmp_path):
    from common.shard_writer import ShardWriter

    w = ShardWriter(str(tmp_path), "feat", 10)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    w.write("0001", {"json": json.dumps({"width": 10, "height": 10}).encode(), "features.npy": buf.getvalue(),
                      "boxes.npy": npy(np.zeros((1, 4), np.float32))})
    w.close()
    with pytest.raises(ValueError, match="0001.features.npy is not a plain .npy"):
        FeatureStore(tmp_path).get(1)


def test_task_registry_is_a_plain_dict_of_task_classes():
    assert set(TASKS) == {"refcoco", "refcoco+", "refcocog", "retrieval", "nlvr2", "snli-ve", "vqa", "gqa", "vcr"}
    assert all(issubclass(cls, Task) for cls in TASKS.values())


def test_cli_help_shows_defaults_and_model_choice_is_checked(tmp_path, capsys):
    from pipelines.eval_cli import main

    status = exit_status(main, ["--help"])
    assert status == 0
    text = capsys.readouterr().out
    listed = "".join(text.split())  # the choices of --task, however the help wraps them
    assert "[gqa|nlvr2|refcoco|refcoco+|refcocog|retrieval|snli-ve|vcr|vqa]" in listed
    assert "3129 for vqa" in text and "--official-checkpoint" in text
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    write_shards(tmp_path / "f", {"1": (np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.jsonl").write_text('{"img_path": "1.jpg", "sentences": ["a"]}\n')
    base = ["--task", "retrieval", "--data", str(tmp_path / "d"), "--features", str(tmp_path / "f"), "--out",
            str(tmp_path / "o"), "--tokenizer", str(tmp_path / "vocab.txt")]
    status = exit_status(main, base)
    assert status == 2 and "exactly one of --checkpoint" in capsys.readouterr().err
    status = exit_status(main, base + ["--init-preset", "vilbert-tiny", "--device", "gpu"])
    assert status == 2 and "'gpu': not a torch device" in capsys.readouterr().err
    status = exit_status(main, base + ["--init-preset", "vilbert-tiny"])  # reads 2048-wide features, the shards 4
    assert status == 1 and "region features are 4 wide, the model reads 2048" in capsys.readouterr().err
    status = exit_status(main, base + ["--init-preset", str(tmp_path / "missing.json")])
    assert status == 1 and "missing.json: a model config JSON not found" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"hidden_size": 64,\n}')
    status = exit_status(main, base + ["--init-preset", str(tmp_path / "broken.json")])
    assert status == 1 and "broken.json: not valid JSON" in capsys.readouterr().err


def test_ambiguous_numeric_ids_need_the_exact_key(tmp_path):
    one = (np.ones((1, 4), np.float32), np.array([[0, 0, 5, 5]], np.float32))
    store = FeatureStore(write_shards(tmp_path, {"train2014_7": one, "val2014_0007": one}))
    assert 7 not in store
    assert store.get("val2014_0007").key == "val2014_0007"


def test_names_from_data_never_leave_the_picture_folder(tmp_path):
    from common.names import inside, safe_name
    from pipelines.tasks.visualize import draw_referring

    assert safe_name("COCO_val2014_42") == "COCO_val2014_42" and safe_name(7) == "7"
    assert safe_name("../../x").startswith("______x-") and "/" not in safe_name("/etc/passwd")
    assert safe_name("猫") != safe_name("犬") and safe_name("猫") == safe_name("猫")  # unique and stable
    assert inside(tmp_path, "a/b.jpg") == (tmp_path / "a" / "b.jpg").resolve()
    assert inside(tmp_path, "../x.jpg") is None and inside(tmp_path, "/etc/passwd") is None
    folder = tmp_path / "out" / "visualize"
    pred = {"image_id": "../../../escaped", "sent_id": "/tmp/abs", "expression": "the dog", "iou": 0.7, "hit": True,
            "gt_box": [1, 1, 20, 20], "pred_box": [2, 2, 18, 18]}
    (tmp_path / "secret.jpg").write_bytes(b"not for drawing")
    with pytest.warns(UserWarning, match="leads outside --images"):
        out = draw_referring(pred, {"width": 40, "height": 30, "file_name": "../secret.jpg"}, tmp_path / "imgs",
                             folder)
    assert out.parent == folder and out.is_file() and list(tmp_path.glob("escaped*")) == []


def test_eval_out_that_is_a_file_is_refused_before_anything(tmp_path, capsys):
    from pipelines.eval_cli import main

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    (tmp_path / "taken").write_text("a file")
    status = exit_status(main, ["--task", "retrieval", "--data", str(tmp_path), "--features", str(tmp_path),
                                "--out", str(tmp_path / "taken" / "sub"), "--tokenizer", str(tmp_path / "vocab.txt"),
                                "--init-preset", "vilbert-tiny"])
    err = capsys.readouterr().err
    assert status == 2 and "--out" in err and "not writable" in err


def test_refs_with_other_id_types_a_checkpoint_without_heads_and_a_non_vocabulary_are_one_line(tmp_path):
    from pipelines.data.tokenization import load_tokenizer as load_caption_tokenizer
    from pipelines.tasks.text import load_tokenizer
    from vilbert import load_pretrained

    refs = [{"ref_id": 1, "ann_id": 1, "image_id": 5, "split": "val", "sentences": [{"raw": "a"}]},
            {"ref_id": 2, "ann_id": 2, "image_id": "5", "split": "val", "sentences": [{"raw": "b"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\).p: ref #1 \(ref_id 2\): 'image_id' is '5' \(str\)"):
        load_refs(tmp_path / "refs(unc).p")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match=r"config.json: no 'task_heads' object"):
        load_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(tmp_path / "ckpt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vocab.txt").write_bytes(bytes(range(256)) * 4)  # a binary file
    (tmp_path / "words").mkdir()
    (tmp_path / "words" / "vocab.txt").write_text("just\nsome\nwords\n")
    for load in (load_tokenizer, load_caption_tokenizer):
        with pytest.raises(ValueError, match="vocab.txt: not a vocabulary"):
            load(tmp_path / "bin" / "vocab.txt")
        with pytest.raises(ValueError, match=r"vocab.txt: not a BERT vocabulary \(no \[PAD\], \[UNK\]"):
            load(tmp_path / "words" / "vocab.txt")
