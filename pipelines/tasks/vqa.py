"""VQA v2 in its official JSON files.

    DATA/v2_OpenEnded_mscoco_{SPLIT}2014_questions.json   {"questions": [{question_id, image_id, question}]}
    DATA/v2_mscoco_{SPLIT}2014_annotations.json           {"annotations": [{question_id, image_id,
                                                            multiple_choice_answer, answers: [{answer}]}]}
(or SPLIT_questions.json / SPLIT_annotations.json). The answer vocabulary is the `num_answers`
(3,129) most frequent normalised `multiple_choice_answer`s of the train annotations, or a given
file (`answers`: JSON list, one answer a line, or the official trainval_label2ans.pkl, read with
the restricted unpickler). Targets are soft scores min(1, count/3) over the vocabulary; the `vqa`
answer head (MLP on h_IMG * h_CLS) is trained with BCE (summed over answers, as in the official
code); evaluation reports the standard VQA accuracy of the top answer.

extra options: answers (file), num_answers (default 3129), train_split (default "train"; several
joined by commas, e.g. "train,val").
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Task, batched, log, read_json, write_json
from .features import check_features, image_batch
from .metrics import normalize_answer, soft_scores, vqa_accuracy
from .refer_pickle import load_plain_pickle
from .text import encode


def _find(data: Path, split: str, kind: str) -> Path | None:
    names = ([f"v2_OpenEnded_mscoco_{split}2014_questions.json", f"{split}_questions.json"] if kind == "questions"
             else [f"v2_mscoco_{split}2014_annotations.json", f"{split}_annotations.json"])
    return next((data / n for n in names if (data / n).is_file()), None)


def load_vqa_split(data: Path, split: str, need_answers: bool = True) -> list[dict]:
    """-> [{question_id, image_id, question, answers (list or None)}]"""
    qpath = _find(data, split, "questions")
    if qpath is None:
        raise FileNotFoundError(f"{data}: no questions file for split {split!r} "
                                f"(v2_OpenEnded_mscoco_{split}2014_questions.json or {split}_questions.json)")
    doc = read_json(qpath, "VQA questions")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise ValueError(f"{qpath}: expected {{\"questions\": [...]}}")
    items = {q["question_id"]: {"question_id": q["question_id"], "image_id": q["image_id"],
                                "question": q["question"], "answers": None} for q in doc["questions"]}
    apath = _find(data, split, "annotations")
    if apath is None:
        if need_answers:
            raise FileNotFoundError(f"{data}: no annotations file for split {split!r}")
        return list(items.values())
    adoc = read_json(apath, "VQA annotations")
    if not isinstance(adoc, dict) or not isinstance(adoc.get("annotations"), list):
        raise ValueError(f"{apath}: expected {{\"annotations\": [...]}}")
    for a in adoc["annotations"]:
        if a["question_id"] not in items:
            raise ValueError(f"{apath}: annotation for unknown question_id {a['question_id']}")
        items[a["question_id"]]["answers"] = [x["answer"] for x in a["answers"]]
        items[a["question_id"]]["mc_answer"] = a.get("multiple_choice_answer")
    return list(items.values())


def load_answer_list(path: Path) -> list[str]:
    if path.suffix in (".p", ".pkl", ".pickle"):
        answers = load_plain_pickle(path)
    elif path.suffix == ".json":
        answers = read_json(path, "answer list")
    else:
        answers = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise ValueError(f"{path}: expected a non-empty list of answer strings")
    return answers


def build_answer_vocab(items: list[dict], size: int) -> list[str]:
    counts = Counter(normalize_answer(it.get("mc_answer") or Counter(it["answers"]).most_common(1)[0][0])
                     for it in items if it["answers"])
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


class VQATask(Task):
    name = "vqa"
    default_splits = ("val",)
    official_task_id = 1  # TASK1 in vilbert-multi-task
    default_lr = 4e-5
    default_max_seq_length = 23

    def __init__(self, opts):
        super().__init__(opts)
        self.load_common()
        x = opts.extra
        self.train_split = x.get("train_split") or "train"
        self._train = None
        if x.get("answers"):
            self.answers = load_answer_list(Path(x["answers"]))
        else:
            self._train = self.load_train()
            self.answers = build_answer_vocab(self._train, int(x.get("num_answers") or 3129))
        self.index = {normalize_answer(a): i for i, a in enumerate(self.answers)}
        write_json(Path(opts.out) / "answers.json", self.answers)
        log.info("vqa: %d answers", len(self.answers))

    def load_train(self) -> list[dict]:
        """The training questions: one split or several joined by commas ("train,val")."""
        items = [it for split in self.train_split.split(",") for it in load_vqa_split(self.data, split.strip())]
        check_features(self.store, sorted({it["image_id"] for it in items}), self.train_split)
        return items

    def head(self):
        return ("vqa", "answer", len(self.answers))

    def make_batch(self, items: list[dict]) -> dict:
        images = image_batch(self.store, [it["image_id"] for it in items], self.opts.max_regions)
        targets = torch.zeros(len(items), len(self.answers))  # (B, A) soft scores
        for i, it in enumerate(items):
            for a, s in soft_scores(it["answers"] or []).items():
                if a in self.index:
                    targets[i, self.index[a]] = s
        text = encode(self.tokenizer, [it["question"] for it in items], self.opts.max_seq_length)
        return {**text, **images, "targets": targets}

    def train_batch(self, rng):
        if self._train is None:
            self._train = self.load_train()
        idx = rng.integers(0, len(self._train), size=self.opts.batch_size)
        return self.make_batch([self._train[i] for i in idx])

    def loss(self, model, batch):
        logits = model.task_logits("vqa", self.backbone(model, batch))  # (B, A)
        return F.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="sum") / logits.shape[0]

    def eval_inputs(self, split: str) -> list[dict]:
        items = load_vqa_split(self.data, split, need_answers=False)
        check_features(self.store, [it["image_id"] for it in items], split)
        return items

    @torch.no_grad()
    def evaluate(self, model, split):
        items = self.eval_inputs(split)
        model.eval()
        preds, scores = [], []
        for chunk in batched(items, self.opts.eval_batch_size):
            batch = self.to_device(self.make_batch(chunk))
            top = model.task_logits("vqa", self.backbone(model, batch)).argmax(1).tolist()  # (B,)
            for it, k in zip(chunk, top):
                preds.append({"question_id": it["question_id"], "answer": self.answers[k]})
                if it["answers"]:
                    scores.append(vqa_accuracy(self.answers[k], it["answers"]))
        metrics = {"questions": len(items)}
        if scores:
            metrics["accuracy"] = sum(scores) / len(scores)
            metrics["answered"] = len(scores)
        return metrics, preds
