"""vilbert-eval's tasks on what the sixth bug hunt found: a split with nothing to evaluate (exit 0, no
metric), ids given twice (counted twice), a ref scored on another image's regions, partly labelled
splits scored on a subset, and messages that named internals instead of the file, record and field."""
import json
import pickle
import shutil

import pytest

from pipelines.tasks import TASKS
from pipelines.tasks.base import TaskOptions, split_names
from pipelines.tasks.gqa import load_gqa_split
from pipelines.tasks.refcoco import load_instances, load_refer
from pipelines.tasks.refer_pickle import load_refs
from pipelines.tasks.retrieval import load_retrieval_split
from pipelines.tasks.vcr_data import load_vcr_split
from pipelines.tasks.vqa import load_answer_list, load_vqa_split

from tasks_data import (
    make_vcr,
    one_line_err,
    run_cli,
    small_datasets,
    tiny_checkpoint,
)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = small_datasets(tmp_path_factory, ('vqa', 'gqa', 'nlvr2', 'snli-ve', 'refcoco+', 'retrieval'))
    out["ckpt"] = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")
    return out


def copied(d: dict, tmp_path) -> dict:
    """The dataset with its annotation folder copied, to edit (the features are shared)."""
    data = tmp_path / "data"
    shutil.copytree(d["data"], data)
    return {**d, "data": data}


def options(d, out, **extra):
    return TaskOptions(data=d["data"], features=d["root"] / "features", out=out, tokenizer=d["vocab"],
                       eval_batch_size=4, workers=0, extra=extra)


def emptied(name: str, data):
    """Edit the evaluated split of `name` so that nothing in it can be evaluated -> (split, message)."""
    if name == "vqa":
        (data / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": []}))
        (data / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": []}))
        return "val", "v2_OpenEnded_mscoco_val2014_questions.json: split 'val' has no questions"
    if name == "nlvr2":
        (data / "dev.json").write_text("")
        return "dev", "dev.json: split 'dev' has no items"
    if name == "gqa":
        (data / "val_balanced_questions.json").write_text("{}")
        return "val", "val_balanced_questions.json: split 'val' has no questions"
    if name == "snli-ve":
        path = data / "snli_ve_dev.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "gold_label": "-"}) + "\n" for r in rows))
        return "dev", "snli_ve_dev.jsonl: every gold_label of split 'dev' is '-' (none): none of its 9 items"
    (data / "test.jsonl").write_text("\n")
    return "test", "test.jsonl: split 'test' has no images"


@pytest.mark.parametrize("name", ["vqa", "nlvr2", "gqa", "snli-ve", "retrieval"])
def test_a_split_with_nothing_to_evaluate_is_one_line_before_fine_tuning(datasets, tmp_path, capsys, name):
    d = copied(datasets[name], tmp_path)
    split, message = emptied(name, d["data"])
    out = tmp_path / "out"
    extra = ("--min-answer-count", "1") if name == "vqa" else ()
    assert run_cli(name, d, out, "--checkpoint", str(datasets["ckpt"]), "--split", split, "--train-steps", "1",
                   "--batch-size", "2", "--val-split", "none", *extra) == 1
    assert message in one_line_err(capsys)
    assert not (out / "checkpoints").exists() and not (out / "finetuned").exists()  # found before fine-tuning


def test_a_labelled_vqa_split_is_scored_whole_or_refused_naming_the_question(datasets, tmp_path, capsys):
    d = copied(datasets["vqa"], tmp_path)
    apath = d["data"] / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(apath.read_text())
    qid = doc["annotations"][3]["question_id"]
    apath.write_text(json.dumps({"annotations": doc["annotations"][:3] + doc["annotations"][4:]}))
    with pytest.raises(ValueError, match=rf"annotations.json: 1 of the 8 questions of .* have no annotation, e.g. "
                                         rf"question_id {qid}; a split is scored whole"):
        load_vqa_split(d["data"], "val", need_answers=False)
    doc["annotations"][3]["answers"] = []  # the official evaluator divides by zero
    apath.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"annotations.json: record #3 \(question {qid}\): 'answers' is empty"):
        load_vqa_split(d["data"], "val", need_answers=False)
    # a whole split: every question scored, and the count says so
    d = datasets["vqa"]
    assert run_cli("vqa", d, tmp_path / "out", "--checkpoint", str(datasets["ckpt"]), "--split", "val",
                   "--min-answer-count", "1") == 0
    assert "vqa val: questions 8, accuracy" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["splits"]["val"]
    assert metrics["scored"] == metrics["questions"] == 8


def test_a_gqa_split_with_some_answers_missing_is_refused_naming_the_question(datasets, tmp_path):
    d = copied(datasets["gqa"], tmp_path)
    path = d["data"] / "val_balanced_questions.json"
    doc = json.loads(path.read_text())
    qid = sorted(doc)[2]
    del doc[qid]["answer"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"val_balanced_questions.json: 1 of the 8 questions have no 'answer', e.g. "
                                         rf"question '{qid}'"):
        load_gqa_split(d["data"], "val")
    path.write_text(json.dumps({k: {f: v for f, v in q.items() if f != "answer"} for k, q in doc.items()}))
    assert all(it["answer"] is None for it in load_gqa_split(d["data"], "val"))  # none: an unlabelled split


def test_a_vcr_split_with_some_labels_missing_is_refused_naming_the_question(tmp_path):
    data = make_vcr(tmp_path, n_questions=(2, 3))
    lines = (data / "val.jsonl").read_text().splitlines()
    unlabelled = {k: v for k, v in json.loads(lines[2]).items() if not k.endswith("_label")}
    (data / "val.jsonl").write_text("\n".join(lines[:2] + [json.dumps(unlabelled)]) + "\n")
    with pytest.raises(ValueError, match=r"val.jsonl: 1 of the 3 questions have no answer_label, e.g. annot_id "
                                         r"'val-2'"):
        load_vcr_split(data, "val")  # it was scored on the other two
    (data / "val.jsonl").write_text(json.dumps(unlabelled) + "\n")
    assert load_vcr_split(data, "val")[0]["answer_label"] is None  # none labelled: answered, as test


def test_ids_given_twice_are_refused_naming_the_file_and_the_id(datasets, tmp_path):
    # retrieval: an image twice in the gallery (SPLIT.jsonl, or the Karpathy file) could never be at rank 1
    d = copied(datasets["retrieval"], tmp_path / "r")
    lines = (d["data"] / "test.jsonl").read_text().splitlines()
    (d["data"] / "test.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl: image '1000092799' appears twice \(line 1 and line 4\)"):
        load_retrieval_split(d["data"], "test")
    images = [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a dog"}]},
              {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "a cat"}]},
              {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a dog again"}]}]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match=r"dataset_flickr30k.json: image '1' appears twice \(images\[0\] and "
                                         r"images\[2\]\)"):
        load_retrieval_split(tmp_path, "test")
    assert load_retrieval_split(tmp_path, "train") == [("2", ["a cat"])]
    # refcoco+: a ref twice, or one sentence in two refs, would be counted twice
    d = copied(datasets["refcoco+"], tmp_path / "c")
    path = d["data"] / "refs(unc).p"
    refs = load_refs(path)
    path.write_bytes(pickle.dumps(refs + [dict(refs[5])], protocol=2))
    with pytest.raises(ValueError, match=rf"refs\(unc\).p: ref #{len(refs)}: ref_id {refs[5]['ref_id']} appears "
                                         r"twice \(first as ref #5\)"):
        load_refer(d["data"])
    other = {**refs[6], "ref_id": 999, "sentences": [dict(refs[5]["sentences"][0])]}
    path.write_bytes(pickle.dumps(refs + [other], protocol=2))
    with pytest.raises(ValueError, match=rf"sent_id {refs[5]['sentences'][0]['sent_id']} appears twice \(ref_id "
                                         rf"{refs[5]['ref_id']} and ref_id 999\)"):
        load_refer(d["data"])
    # VCR: an annot_id twice; SNLI-VE: a pairID twice
    data = make_vcr(tmp_path / "v", n_questions=(2, 3))
    lines = (data / "val.jsonl").read_text().splitlines()
    (data / "val.jsonl").write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"val.jsonl: annot_id 'val-1' appears twice \(line 2 and line 4\)"):
        load_vcr_split(data, "val")
    d = copied(datasets["snli-ve"], tmp_path / "s")
    lines = (d["data"] / "snli_ve_dev.jsonl").read_text().splitlines()
    (d["data"] / "snli_ve_dev.jsonl").write_text("\n".join(lines + [lines[2]]) + "\n")
    pair = json.loads(lines[2])["pairID"]
    with pytest.raises(ValueError, match=rf"snli_ve_dev.jsonl: pairID '{pair}' appears twice \(line 3 and line 10\)"):
        TASKS["snli-ve"](options(d, tmp_path / "o")).eval_inputs("dev")


def test_a_training_split_named_twice_or_empty_is_one_line(datasets, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--train-split 'train,val,train': split 'train' is named twice"):
        split_names("train,val,train")
    with pytest.raises(ValueError, match=r"--train-split 'train,': a split name is empty"):
        split_names("train,")
    assert split_names(" train , val") == ["train", "val"]
    d = datasets["vqa"]
    for name, extra in (("vqa", {"min_answer_count": 1}), ("gqa", {})):
        with pytest.raises(ValueError, match="split 'train' is named twice"):
            TASKS[name](options(datasets[name], tmp_path / name, train_split="train,train", **extra))
    assert run_cli("vqa", d, tmp_path / "out", "--checkpoint", str(datasets["ckpt"]), "--train-split", "train,train",
                   "--train-steps", "1", "--min-answer-count", "1") == 1  # 32 items of a 16-item split before
    assert "--train-split 'train,train': split 'train' is named twice" in one_line_err(capsys)
    assert run_cli("vqa", d, tmp_path / "o2", "--checkpoint", str(datasets["ckpt"]), "--train-split", "train,",
                   "--train-steps", "1") == 2  # a usage error, before anything
    assert "'train,': a split name is empty (several are joined by commas" in capsys.readouterr().err


def test_a_ref_on_another_image_and_a_box_outside_its_image_are_refused(datasets, tmp_path):
    d = copied(datasets["refcoco+"], tmp_path)
    inst_path = d["data"] / "instances.json"
    inst = json.loads(inst_path.read_text())
    ann = inst["annotations"][0]
    inst["annotations"][0] = {**ann, "image_id": 2}  # the ref says image 1
    inst_path.write_text(json.dumps(inst))
    ref = next(r for r in load_refs(d["data"] / "refs(unc).p") if r["ann_id"] == ann["id"])
    with pytest.raises(ValueError, match=rf"refs\(unc\).p: ref_id {ref['ref_id']} is of image_id 1, its annotation "
                                         rf"{ann['id']} of image_id 2 in instances.json"):
        load_refer(d["data"])
    inst["annotations"][0] = {**ann, "bbox": [500, 500, 20, 20]}  # the image is 100 x 100
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=rf"instances.json: annotation {ann['id']}: bbox \[500, 500, 20, 20\] lies "
                                         r"wholly outside its 100x100 image 1"):
        load_instances(inst_path)
    inst["annotations"][0] = {**ann, "bbox": [90, 90, 20, 20]}  # partly inside: kept
    inst_path.write_text(json.dumps(inst))
    assert load_instances(inst_path)[0][ann["id"]] == [90, 90, 20, 20]


def test_messages_name_the_file_line_and_field_or_the_option(datasets, tmp_path):
    d = copied(datasets["retrieval"], tmp_path / "r")
    path = d["data"] / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "img_path": 1000092801})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: .*'img_path' is 1000092801 \(int\), expected a file name"):
        load_retrieval_split(d["data"], "test")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "green", "red", "blue"]))
    with pytest.raises(ValueError, match=r"answers.json: answer 'red' appears twice \(entry #0 and entry #2\)"):
        load_answer_list(answers)
    r = datasets["refcoco+"]
    with pytest.raises(ValueError, match=r"^--eval-on-gt-boxes needs --gt-boxes \(shards extracted with "
                                         r"vilbert-extract --gt-boxes\)$"):
        TASKS["refcoco+"](options(r, tmp_path / "o", eval_on_gt=True))
