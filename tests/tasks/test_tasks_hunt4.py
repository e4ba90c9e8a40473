"""vilbert-eval's tasks on what the fourth bug hunt found: a FIFO where a file is read (one line, never
a hang), a model whose scores are NaN (an error naming the split and the count, not an accuracy),
the answer vocabulary a fine-tuned model depends on (`Task.settings`, checked by `Task.prepare`) and
splits without labels (`Task.has_labels`)."""
import hashlib
import json
import os
import shutil
from functools import partial

import pytest
import torch
from fifo_watch import returns_without_blocking

from pipelines.tasks import TASKS
from pipelines.tasks.base import TaskOptions, read_json
from pipelines.tasks.refer_pickle import load_refs
from pipelines.tasks.vcr_data import load_vcr_split, read_names_table
from pipelines.tasks.vqa import load_answer_list, load_vqa_split
from vilbert import ViLBert, load_pretrained, save_pretrained

from tasks_data import (
    VCR_WORDS,
    run_cli,
    small_datasets,
    tiny_checkpoint,
    tiny_config,
    vocab_size,
)

EVAL_SPLIT = {"vqa": "val", "gqa": "val", "nlvr2": "dev", "snli-ve": "dev", "refcoco+": "val", "vcr": "val"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return small_datasets(tmp_path_factory)


def options(d, out, **extra):
    return TaskOptions(data=d["data"], features=d["root"] / "features", out=out, tokenizer=d["vocab"],
                       eval_batch_size=4, workers=0, extra=extra)


def task_of(name, d, out, **extra):
    if name == "vqa":
        extra.setdefault("min_answer_count", 1)
    return TASKS[name](options(d, out, **extra))


def fifo_in_place_of(path):
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def test_a_fifo_where_a_task_reads_a_file_is_one_line_naming_it(datasets, tmp_path):
    d = datasets["vqa"]
    f = fifo_in_place_of(tmp_path / "answers.json")
    for call in (lambda: load_answer_list(f), lambda: read_json(f, "VQA questions"),
                 lambda: load_refs(f), lambda: read_names_table(f)):
        error = returns_without_blocking(call, [f])
        assert isinstance(error, ValueError) and f"{f}: not a regular file (a FIFO)" in str(error), error
    # the val annotations a FIFO: an error naming it, not a split without annotations
    data = tmp_path / "vqa"
    shutil.copytree(d["data"], data)
    ann = fifo_in_place_of(data / "v2_mscoco_val2014_annotations.json")
    error = returns_without_blocking(lambda: load_vqa_split(data, "val", need_answers=False), [ann])
    assert isinstance(error, ValueError) and f"{ann}: not a regular file (a FIFO)" in str(error), error
    # each task's split files
    for name, path in (("gqa", "val_balanced_questions.json"), ("nlvr2", "dev.json"),
                       ("snli-ve", "snli_ve_dev.jsonl"), ("retrieval", "test.jsonl"), ("vcr", "val.jsonl")):
        data = tmp_path / name
        shutil.copytree(datasets[name]["data"], data)
        f = fifo_in_place_of(data / path)
        task = returns_without_blocking(partial(task_of, name, {**datasets[name], "data": data}, tmp_path / "o"), [f])
        assert not isinstance(task, BaseException), task
        split = {"gqa": "val", "nlvr2": "dev", "snli-ve": "dev", "retrieval": "test", "vcr": "val"}[name]
        error = returns_without_blocking(partial(task.eval_inputs, split), [f])
        assert isinstance(error, ValueError) and f"{f}: not a regular file (a FIFO)" in str(error), (name, error)
    data = tmp_path / "vcr_names"
    shutil.copytree(datasets["vcr"]["data"], data)
    f = fifo_in_place_of(data / "unisex_names_table.csv")
    error = returns_without_blocking(lambda: task_of("vcr", {**datasets["vcr"], "data": data}, tmp_path / "o"), [f])
    assert isinstance(error, ValueError) and f"{f}: not a regular file (a FIFO)" in str(error), error
    data = tmp_path / "refer"
    shutil.copytree(datasets["refcoco+"]["data"], data)
    f = fifo_in_place_of(data / "refs(unc).p")
    error = returns_without_blocking(lambda: task_of("refcoco+", {**datasets["refcoco+"], "data": data},
                                                     tmp_path / "o"), [f])
    assert isinstance(error, ValueError) and f"{f}: not a regular file (a FIFO)" in str(error), error


def test_vilbert_eval_on_fifo_weights_and_answers_is_one_line(datasets, tmp_path, capsys):
    d = {**datasets["vqa"], "ckpt": tiny_checkpoint(tmp_path / "ckpt")}
    f = fifo_in_place_of(tmp_path / "fifo")
    broken = tmp_path / "broken"
    shutil.copytree(d["ckpt"], broken)
    weights = fifo_in_place_of(broken / "model.safetensors")
    runs = [(["--official-checkpoint", str(f)], f), (["--checkpoint", str(d["ckpt"]), "--answers", str(f)], f),
            (["--checkpoint", str(broken)], weights)]
    for k, (args, named) in enumerate(runs):
        capsys.readouterr()
        status = returns_without_blocking(partial(run_cli, "vqa", d, tmp_path / f"out{k}", "--min-answer-count", "1",
                                                  *args), [f, weights])
        err = capsys.readouterr().err
        assert status == 1, (args, status, err)
        assert f"{named}: not a regular file (a FIFO)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["vqa", "gqa", "nlvr2", "snli-ve", "refcoco+"])
def test_nan_scores_are_an_error_naming_the_split_not_an_accuracy(datasets, tmp_path, name):
    task = task_of(name, datasets[name], tmp_path)
    model = ViLBert(tiny_config())
    task.prepare(model)
    split = EVAL_SPLIT[name]
    metrics, _ = task.evaluate(model, split)  # finite weights: a metric
    assert "accuracy" in metrics
    with torch.no_grad():
        model.backbone.embeddings.norm.weight[0] = float("nan")  # every score NaN
    with pytest.raises(ValueError) as caught:
        task.evaluate(model, split)
    n = metrics.get("questions", metrics.get("count"))
    text = str(caught.value)
    assert text.startswith(f"{name} {split}: {n} of {n} ") and "not finite (NaN or infinite)" in text, text
    assert "\n" not in text


def test_nan_scores_of_an_unlabelled_vcr_split_are_refused_too(datasets, tmp_path):
    d = datasets["vcr"]
    data = tmp_path / "vcr"
    shutil.copytree(d["data"], data)
    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()]
    (data / "test.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_label")})
                                             + "\n" for r in rows))
    task = task_of("vcr", {**d, "data": data}, tmp_path)
    model = ViLBert(tiny_config(vocab_size=vocab_size(VCR_WORDS)))
    task.prepare(model)
    with torch.no_grad():
        model.backbone.embeddings.norm.weight[0] = float("nan")
    for split in ("test", "val"):
        with pytest.raises(ValueError, match=rf"(vcr {split}: )?4 of 4 (VCR )?questions have (a score|scores) that "
                                             "(is|are) not finite"):
            task.evaluate(model, split)


def answers_sha(answers):
    return hashlib.sha256(json.dumps(list(answers)).encode("utf-8")).hexdigest()


@pytest.mark.parametrize("name", ["vqa", "gqa"])
def test_the_answer_vocabulary_is_a_setting_that_a_fine_tuned_model_must_share(datasets, tmp_path, name):
    d = datasets[name]
    task = task_of(name, d, tmp_path / "a")
    answers = json.loads((tmp_path / "a" / "answers.json").read_text())
    assert task.settings() == {"answers": answers_sha(answers), "answer_count": len(answers)}
    (tmp_path / "reversed.json").write_text(json.dumps(answers[::-1]))
    other = task_of(name, d, tmp_path / "b", answers=str(tmp_path / "reversed.json"))
    assert other.settings()["answers"] != task.settings()["answers"]
    assert other.settings()["answer_count"] == len(answers)
    # a model fine-tuned with `task`'s vocabulary, as the fine-tuning loop saves it
    model = ViLBert(tiny_config())
    task.prepare(model)
    save_pretrained(model, tmp_path / "ft", {"task": name, "task_settings": {name: task.settings()}})
    again = task_of(name, d, tmp_path / "c", answers=str(tmp_path / "a" / "answers.json"))
    again.prepare(load_pretrained(tmp_path / "ft"))  # the same list: fine
    with pytest.raises(ValueError) as caught:
        other.prepare(load_pretrained(tmp_path / "ft"))
    text = str(caught.value)
    assert f"fine-tuned on {name} with another answer vocabulary ({len(answers)} answers, sha256 " \
           f"{task.settings()['answers'][:12]}" in text and "pass the answers.json of its run" in text, text
    assert "\n" not in text
    # other tasks' entries, models without metadata and settings one side does not know are not compared
    other.prepare(ViLBert(tiny_config()))
    plain = ViLBert(tiny_config())
    plain.checkpoint_metadata = {"task_settings": {"nlvr2": {"answers": "x"}, name: {"future": 1}}}
    other.prepare(plain)


def test_vilbert_eval_of_a_fine_tuned_vqa_model_with_another_answer_list_is_one_line(datasets, tmp_path, capsys):
    d = datasets["vqa"]
    task = task_of("vqa", d, tmp_path / "a")
    model = ViLBert(tiny_config())
    task.prepare(model)
    save_pretrained(model, tmp_path / "ft", {"task_settings": {"vqa": task.settings()}})
    (tmp_path / "reversed.json").write_text(json.dumps(task.answers[::-1]))
    d = {**d, "ckpt": tmp_path / "ft"}
    assert run_cli("vqa", d, tmp_path / "ok", "--checkpoint", str(tmp_path / "ft"), "--answers",
                   str(tmp_path / "a" / "answers.json")) == 0
    capsys.readouterr()
    assert run_cli("vqa", d, tmp_path / "bad", "--checkpoint", str(tmp_path / "ft"), "--answers",
                   str(tmp_path / "reversed.json")) == 1
    err = capsys.readouterr().err
    assert "another answer vocabulary" in err and err.count("\n") == 1, err


def test_has_labels_says_which_splits_can_be_scored(datasets, tmp_path):
    default = TASKS["nlvr2"].__mro__[-2]  # base.Task
    assert default.has_labels(None, "anything") is True and default.settings(None) == {}
    for name, split in {**EVAL_SPLIT, "retrieval": "test"}.items():
        assert task_of(name, datasets[name], tmp_path / "out" / name).has_labels(split) is True, name
    # VQA test-dev: questions only
    d = datasets["vqa"]
    data = tmp_path / "vqa"
    shutil.copytree(d["data"], data)
    shutil.copy(data / "v2_OpenEnded_mscoco_val2014_questions.json",
                data / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
    vqa = task_of("vqa", {**d, "data": data}, tmp_path / "o263")
    assert vqa.has_labels("test-dev") is False
    with pytest.raises(FileNotFoundError, match="no questions file for split 'nosuch'"):
        vqa.has_labels("nosuch")
    # VCR test: no labels
    data = tmp_path / "vcr"
    shutil.copytree(datasets["vcr"]["data"], data)
    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()]
    (data / "test.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_label")})
                                             + "\n" for r in rows))
    assert all(it["answer_label"] is None for it in load_vcr_split(data, "test"))
    assert task_of("vcr", {**datasets["vcr"], "data": data}, tmp_path / "o274").has_labels("test") is False
    # GQA and SNLI-VE splits without answers / gold labels
    data = tmp_path / "gqa"
    shutil.copytree(datasets["gqa"]["data"], data)
    doc = json.loads((data / "testdev_balanced_questions.json").read_text())
    (data / "testdev_balanced_questions.json").write_text(json.dumps(
        {k: {f: v for f, v in q.items() if f != "answer"} for k, q in doc.items()}))
    assert task_of("gqa", {**datasets["gqa"], "data": data}, tmp_path / "o281").has_labels("testdev") is False
    data = tmp_path / "snli"
    shutil.copytree(datasets["snli-ve"]["data"], data)
    rows = [json.loads(line) for line in (data / "snli_ve_test.jsonl").read_text().splitlines()]
    (data / "snli_ve_test.jsonl").write_text("".join(json.dumps({**r, "gold_label": "-"}) + "\n" for r in rows))
    assert task_of("snli-ve", {**datasets["snli-ve"], "data": data}, tmp_path / "o286").has_labels("test") is False
    # retrieval: images without captions; refcoco+: a split without refs is the error of evaluate
    data = tmp_path / "retr"
    shutil.copytree(datasets["retrieval"]["data"], data)
    (data / "val.jsonl").write_text(json.dumps({"img_path": "1000092795.jpg", "sentences": []}) + "\n")
    assert task_of("retrieval", {**datasets["retrieval"], "data": data}, tmp_path / "o291").has_labels("val") is False
    with pytest.raises(ValueError, match="no refs in split 'nosuch'"):
        task_of("refcoco+", datasets["refcoco+"], tmp_path / "o293").has_labels("nosuch")
