"""Annotation files that are wrong in ways the loaders used to miss: each is one line naming the file
and the record, before any fine-tuning."""
import json
import shutil

import numpy as np
import pytest

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.nlvr2 import NLVR2Task
from pipelines.tasks.refcoco import RefCOCOTask, load_instances, load_refer
from pipelines.tasks.vqa import load_vqa_split

from tasks_data import make_nlvr2, make_refer, make_vqa, write_shards, write_vocab


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer_checks")
    return {"root": root, "data": make_refer(root, n_images=(6, 3, 2, 2)), "vocab": write_vocab(root)}


def edited_instances(refer, tmp_path, edit):
    data = tmp_path / "data"
    shutil.copytree(refer["data"], data)
    inst = json.loads((data / "instances.json").read_text())
    edit(inst)
    (data / "instances.json").write_text(json.dumps(inst))
    return data


@pytest.mark.parametrize("edit,message", [
    (lambda inst: inst["annotations"][2].update(bbox=None), r"annotation 3: bbox None is not \[x, y, w, h\]"),
    (lambda inst: inst["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotation 1: bbox \[1, 2, -3, 4\]"),
    (lambda inst: inst["annotations"][0].update(bbox=[1, 2, "3", 4]), r"annotation 1: bbox"),
    (lambda inst: inst.update(annotations={"1": {}}), r"expected COCO instances, an object with lists 'images'"),
    (lambda inst: inst["annotations"].append("box"), r"annotation #\d+ is not an object with an 'id'"),
    (lambda inst: inst["images"][1].update(width=0), r"image 2: width and height \(0, 100\) are not positive"),
    (lambda inst: inst["images"][1].pop("height"), r"image 2: width and height \(100, None\)"),
])
def test_bad_coco_instances_are_one_line(refer, tmp_path, edit, message):
    data = edited_instances(refer, tmp_path, edit)
    with pytest.raises(ValueError, match=r"instances.json: " + message):
        load_instances(data / "instances.json")
    with pytest.raises(ValueError, match=message):
        load_refer(data)


def test_eval_on_gt_boxes_checks_the_gt_store_up_front(refer, tmp_path):
    gt = write_shards(tmp_path / "gt", {"COCO_train2014_000000999999": (np.ones((2, 32)), np.ones((2, 4)))},
                      mode="gt-boxes")  # ground-truth boxes of another image only
    opts = TaskOptions(data=refer["data"], features=refer["root"] / "features", out=tmp_path / "o",
                       tokenizer=refer["vocab"], extra={"gt_features": gt, "eval_on_gt": True})
    with pytest.raises(KeyError, match=r"no features for \d+ refer ground-truth-box images"):
        RefCOCOTask(opts)


def test_duplicate_vqa_questions_and_annotations_are_refused(tmp_path):
    data = make_vqa(tmp_path, n_train=4, n_val=2)
    qpath = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    doc = json.loads(qpath.read_text())
    doc["questions"].append(dict(doc["questions"][0]))
    qpath.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"questions.json: record #4: question_id \d+ appears twice"):
        load_vqa_split(data, "val")
    doc["questions"].pop()
    qpath.write_text(json.dumps(doc))
    apath = data / "v2_mscoco_val2014_annotations.json"
    ann = json.loads(apath.read_text())
    ann["annotations"].append(dict(ann["annotations"][1]))
    apath.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"annotations.json: record #4: a second annotation of question_id"):
        load_vqa_split(data, "val")


def test_duplicate_nlvr2_identifiers_are_refused(tmp_path):
    data = make_nlvr2(tmp_path, n_pairs=(8, 4, 4))
    path = data / "dev.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[1]]) + "\n")
    opts = TaskOptions(data=data, features=tmp_path / "features", out=tmp_path / "o",
                       tokenizer=write_vocab(tmp_path))
    with pytest.raises(ValueError, match=rf"dev.json:{len(lines) + 1}: identifier .* again \(first on line 2\)"):
        NLVR2Task(opts).load_split("dev")


def test_sentence_ids_come_from_the_sentences_when_sent_ids_is_short(tmp_path):
    import pickle

    data = tmp_path / "refer"
    data.mkdir()
    refs = [{"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "sent_ids": [11],
             "sentences": [{"raw": "a", "sent_id": 11}, {"raw": "b", "sent_id": 12}, {"raw": "c"}]}]
    (data / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (data / "instances.json").write_text(json.dumps({"images": [{"id": 1, "width": 10, "height": 10}],
                                                     "annotations": [{"id": 1, "bbox": [1, 2, 3, 4]}]}))
    assert [e["sent_id"] for e in load_refer(data)["val"]] == [11, 12, None]


def test_an_earlier_runs_answer_list_in_out_is_kept_or_the_run_refused(tmp_path):
    from pipelines.tasks.vqa import VQATask

    data = make_vqa(tmp_path, n_train=4, n_val=2)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "green", "blue", "yellow"]))
    out = tmp_path / "out"
    opts = dict(data=data, features=tmp_path / "features", out=out, tokenizer=write_vocab(tmp_path))
    VQATask(TaskOptions(**opts, extra={"answers": answers}))
    VQATask(TaskOptions(**opts, extra={"answers": answers}))  # the same list again: kept
    assert json.loads((out / "answers.json").read_text()) == ["red", "green", "blue", "yellow"]
    answers.write_text(json.dumps(["yellow", "blue", "green", "red"]))  # same size, other order
    (out / "finetuned").mkdir()  # once OUT holds a fine-tuned model, its answer list stays with it
    with pytest.raises(ValueError, match=r"answers.json: the run in this --out \(finetuned/\) was fine-tuned with "
                                         r"another answer vocabulary \(4 answers, this run 4\); pass --answers"):
        VQATask(TaskOptions(**opts, extra={"answers": answers}))
    assert json.loads((out / "answers.json").read_text()) == ["red", "green", "blue", "yellow"]  # not overwritten
    (out / "finetuned").rmdir()  # evaluations only: the new list is written
    VQATask(TaskOptions(**opts, extra={"answers": answers}))
    assert json.loads((out / "answers.json").read_text()) == ["yellow", "blue", "green", "red"]
