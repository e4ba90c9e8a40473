"""VQA v2 in its official JSON files.

    DATA/v2_OpenEnded_mscoco_{SPLIT}2014_questions.json   {"questions": [{question_id, image_id, question}]}
    DATA/v2_mscoco_{SPLIT}2014_annotations.json           {"annotations": [{question_id, image_id,
                                                            multiple_choice_answer, answers: [{answer}]}]}
(or SPLIT_questions.json / SPLIT_annotations.json; test-dev and test are the 2015 files). The
answer vocabulary is a given file (`answers`: JSON list, one answer a line, or the released
trainval_label2ans.pkl, read with the restricted unpickler) or built as the released preprocessing
builds it (`vqa_eval.py`): the normalised `multiple_choice_answer`s that at least `min_answer_count`
(9) training questions give, the most frequent `num_answers` (3,129) of them. Targets are the
released soft scores (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 annotators) of the raw human answers
found in the vocabulary; the `vqa` answer head (MLP on h_IMG * h_CLS) is trained with BCE (summed
over answers, as in the official code). Evaluation reports the official VQA accuracy of the top
answer (`vqa_eval.vqa_accuracy`), overall and per answer type; the predictions of a split without
annotations (test-dev, test) are the EvalAI submission file, [{"question_id", "answer"}].

extra options: answers (file), num_answers (default 3129), min_answer_count (default 9),
train_split (default "train"; several joined by commas, e.g. "train,val").
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from common.safe_load import regular_file

from .base import (
    Task,
    answers_settings,
    batched,
    first_seen,
    keep_answer_list,
    log,
    no_items,
    read_json,
    split_names,
)
from .distributed import is_main
from .features import check_features, image_batch
from .metrics import check_finite_items
from .refer_pickle import load_plain_pickle
from .text import encode, encode_with_mask_slot
from .vqa_eval import answer_score, preprocess_answer, vqa_accuracy


def _find(data: Path, split: str, kind: str) -> Path | None:
    """The split's questions or annotations file, None if there is none; something else under its
    name (a FIFO, a folder, a dangling link) is an error naming it, not a split without annotations."""
    official = "v2_OpenEnded_mscoco_{}{}_questions.json" if kind == "questions" else "v2_mscoco_{}{}_annotations.json"
    names = [official.format(split, year) for year in (2014, 2015)] + [f"{split}_{kind}.json"]
    found = next((data / n for n in names if (data / n).exists() or (data / n).is_symlink()), None)
    return None if found is None else regular_file(found, f"VQA {kind}")


def _record(path: Path, k: int, record, fields: dict) -> None:
    """A one-line error naming the file, the record and the field unless `record` has every field
    of the right type."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record #{k} is a {type(record).__name__}, expected an object")
    for name, kinds in fields.items():
        if name not in record:
            raise ValueError(f"{path}: record #{k} has no {name!r}")
        if not isinstance(record[name], kinds) or isinstance(record[name], bool):
            raise ValueError(f"{path}: record #{k}: {name!r} is {record[name]!r}, expected "
                             + " or ".join(t.__name__ for t in (kinds if isinstance(kinds, tuple) else (kinds,))))


def load_vqa_split(data: Path, split: str, need_answers: bool = True) -> list[dict]:
    """-> [{question_id, image_id, question, answers (list or None), mc_answer, answer_type}]"""
    qpath = _find(data, split, "questions")
    if qpath is None:
        raise FileNotFoundError(f"{data}: no questions file for split {split!r} (v2_OpenEnded_mscoco_{split}2014"
                                f"_questions.json, ..._{split}2015_questions.json or {split}_questions.json)")
    doc = read_json(qpath, "VQA questions")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise ValueError(f"{qpath}: expected {{\"questions\": [...]}}")
    if not doc["questions"]:  # nothing to evaluate: it would exit 0 with no metric
        raise no_items(qpath, split, "questions")
    items = {}
    for k, q in enumerate(doc["questions"]):
        _record(qpath, k, q, {"question_id": int, "image_id": (int, str), "question": str})
        if q["question_id"] in items:  # the official evaluator would score it once, or refuse the results
            raise ValueError(f"{qpath}: record #{k}: question_id {q['question_id']} appears twice")
        items[q["question_id"]] = {"question_id": q["question_id"], "image_id": q["image_id"],
                                   "question": q["question"], "answers": None}
    apath = _find(data, split, "annotations")
    if apath is None:
        if need_answers:
            raise FileNotFoundError(f"{data}: no annotations file for split {split!r}")
        return list(items.values())
    adoc = read_json(apath, "VQA annotations")
    if not isinstance(adoc, dict) or not isinstance(adoc.get("annotations"), list):
        raise ValueError(f"{apath}: expected {{\"annotations\": [...]}}")
    for k, a in enumerate(adoc["annotations"]):
        _record(apath, k, a, {"question_id": int, "answers": list})
        if a["question_id"] not in items:
            raise ValueError(f"{apath}: annotation for unknown question_id {a['question_id']}")
        if items[a["question_id"]]["answers"] is not None:
            raise ValueError(f"{apath}: record #{k}: a second annotation of question_id {a['question_id']}")
        if not isinstance(a.get("multiple_choice_answer", ""), str):
            raise ValueError(f"{apath}: record #{k} (question {a['question_id']}): 'multiple_choice_answer' is "
                             f"{a['multiple_choice_answer']!r}, expected a string")
        if not a["answers"]:  # the official evaluator divides by their number
            raise ValueError(f"{apath}: record #{k} (question {a['question_id']}): 'answers' is empty; the "
                             "official evaluator cannot score a question without human answers")
        for answer in a["answers"]:
            if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                raise ValueError(f"{apath}: record #{k} (question {a['question_id']}): each of 'answers' must be "
                                 f"an object with an 'answer' string, got {answer!r}")
        items[a["question_id"]].update(answers=[x["answer"] for x in a["answers"]],
                                       mc_answer=a.get("multiple_choice_answer"), answer_type=a.get("answer_type"))
    unannotated = [qid for qid, it in items.items() if it["answers"] is None]
    if unannotated:  # the official evaluator refuses results whose questions its annotations do not cover
        raise ValueError(f"{apath}: {len(unannotated)} of the {len(items)} questions of {qpath.name} have no "
                         f"annotation, e.g. question_id {unannotated[0]}; a split is scored whole or not at all")
    return list(items.values())


def load_answer_list(path: Path) -> list[str]:
    path = regular_file(path, "answer list")
    if path.suffix in (".p", ".pkl", ".pickle"):
        answers = load_plain_pickle(path)
    elif path.suffix == ".json":
        answers = read_json(path, "answer list")
    else:
        answers = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise ValueError(f"{path}: expected a non-empty list of answer strings")
    seen: dict = {}
    for k, answer in enumerate(answers):  # two outputs of one answer: the head's classes would not be answers
        first_seen(seen, answer, f"entry #{k}", "answer", path)
    return answers


def build_answer_vocab(items: list[dict], size: int, min_count: int = 9) -> list[str]:
    """The released vocabulary: each question's normalised `multiple_choice_answer` (else its most
    common human answer), kept when at least `min_count` questions give it; the `size` most frequent
    (ties alphabetically; the released file's own order is that of a Python 2 dict)."""
    counts = Counter(preprocess_answer(it.get("mc_answer") or Counter(it["answers"]).most_common(1)[0][0])
                     for it in items if it["answers"])
    kept = [(a, c) for a, c in counts.items() if c >= min_count]
    return [a for a, _ in sorted(kept, key=lambda kv: (-kv[1], kv[0]))[:size]]


class VQATask(Task):
    name = "vqa"
    default_splits = ("val",)
    official_task_id = 1  # TASK1 in vilbert-multi-task
    default_lr = 4e-5
    default_max_seq_length = 23
    default_batch_size = 128
    val_split = "val"  # official: minval, the val questions not in trainval

    def __init__(self, opts):
        super().__init__(opts)
        self.load_common()
        x = opts.extra
        self.train_splits = split_names(x.get("train_split") or "train")  # "train,val": each once
        self.train_split = ",".join(self.train_splits)
        self._train = None
        if x.get("answers"):
            self.answers = load_answer_list(Path(x["answers"]))
        else:
            self._train = self.load_train()
            self.answers = build_answer_vocab(self._train, int(x.get("num_answers") or 3129),
                                              int(x.get("min_answer_count") or 9))
            if not self.answers:
                raise ValueError(f"{self.data}: no answer is given by {x.get('min_answer_count') or 9} training "
                                 "questions (lower --min-answer-count, or pass --answers)")
        self.index = {a: i for i, a in enumerate(self.answers)}  # exact strings, as the released targets
        if is_main():  # under torchrun one process writes it
            keep_answer_list(Path(opts.out) / "answers.json", self.answers)
        log.info("vqa: %d answers", len(self.answers))

    def load_train(self) -> list[dict]:
        """The training questions: one split or several joined by commas ("train,val")."""
        items = [it for split in self.train_splits for it in load_vqa_split(self.data, split)]
        check_features(self.store, sorted({it["image_id"] for it in items}), self.train_split)
        return items

    def head(self):
        if self.arch == "vlbert":  # VL-BERT: the hidden state of a [MASK] after the question
            return ("vqa", "masked_answer", len(self.answers))
        return ("vqa", "answer", len(self.answers))

    def make_batch(self, items: list[dict]) -> dict:
        images = image_batch(self.store, [it["image_id"] for it in items], self.opts.max_regions)
        targets = torch.zeros(len(items), len(self.answers))  # (B, A) soft scores
        for i, it in enumerate(items):
            for a, n in Counter(it["answers"] or []).items():  # raw answers, as the released targets
                if a in self.index:
                    targets[i, self.index[a]] = answer_score(n)
        questions = [it["question"] for it in items]
        text = (encode_with_mask_slot(self.tokenizer, questions, self.opts.max_seq_length) if self.arch == "vlbert"
                else encode(self.tokenizer, questions, self.opts.max_seq_length))
        return {**text, **images, "targets": targets}

    def logits(self, model, batch) -> torch.Tensor:
        """(B, A) answer scores: from h_IMG * h_CLS (ViLBERT) or the [MASK] after the question (VL-BERT)."""
        return model.task_logits("vqa", self.backbone(model, batch), positions=batch.get("mask_position"))

    def train_items(self):
        if self._train is None:
            self._train = self.load_train()
        return self._train

    def collate(self, items, rng):
        return self.make_batch(items)

    def loss(self, model, batch):
        logits = self.logits(model, batch)  # (B, A)
        return F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="sum") / logits.shape[0]

    def settings(self) -> dict:
        return answers_settings(self.answers)

    def has_labels(self, split: str) -> bool:
        return any(it["answers"] for it in load_vqa_split(self.data, split, need_answers=False))

    def eval_inputs(self, split: str) -> list[dict]:
        items = load_vqa_split(self.data, split, need_answers=False)
        check_features(self.store, [it["image_id"] for it in items], split)
        return items

    @torch.no_grad()
    def evaluate(self, model, split):
        items = self.eval_inputs(split)
        model.eval()
        def run(chunk, batch):
            logits = self.logits(model, batch)  # (B, A)
            return list(zip(logits.argmax(1).tolist(), torch.isfinite(logits).all(1).tolist()))

        outputs = self.map_chunks(list(batched(items, self.opts.eval_batch_size)), self.make_batch, run)
        check_finite_items([ok for _, ok in outputs], [it["question_id"] for it in items], f"vqa {split}",
                           "questions")
        preds, scores, by_type = [], [], {}
        for it, (k, _) in zip(items, outputs):
            preds.append({"question_id": it["question_id"], "answer": self.answers[k]})
            if it["answers"]:
                scores.append(vqa_accuracy(self.answers[k], it["answers"]))
                by_type.setdefault(it.get("answer_type") or "unknown", []).append(scores[-1])
        metrics = {"questions": len(items)}
        if scores:  # a split without annotations (test-dev, test): predictions only, for EvalAI
            metrics["accuracy"] = sum(scores) / len(scores)
            metrics["scored"] = len(scores)  # every question of a labelled split (a partial one is refused)
            for kind, values in sorted(by_type.items()):
                metrics[f"accuracy_{kind}"] = sum(values) / len(values)
        return metrics, preds
