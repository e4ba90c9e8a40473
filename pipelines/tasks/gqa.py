"""GQA (balanced) in its released files.

    DATA/{train,val,testdev}_balanced_questions.json   {question id: {"imageId", "question", "answer", ...}}

(or SPLIT_questions.json). As vilbert-multi-task TASK15 (`gqa_dataset.py`, type VL-classifier-GQA):
classification over an answer vocabulary with the head `vil_prediction_gqa` (`gqa`: the VQA MLP),
BCE on the one-hot answer summed over answers, 26 tokens, lr 4e-5. The vocabulary is `answers`
(the released trainval_label2ans.pkl: 1,533 answers; JSON list or one a line) or the training
answers, most frequent first. A question whose answer is not in the vocabulary is not trained on
and scores 0. Metric: exact-match accuracy on testdev-balanced, as GQA's own eval.py; the
predictions file is its submission format, [{"questionId", "prediction"}].

extra options: answers (file), num_answers (default 1533), train_split (default "train"; several joined
by commas, e.g. "train,val").
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch.nn.functional as F

from .base import answers_settings, keep_answer_list, log, no_items, read_json, split_names
from .classification import SentenceImagesTask
from .distributed import is_main
from .vqa import load_answer_list


def load_gqa_split(data: Path, split: str) -> list[dict]:
    """-> [{id, sentence (the question), images: [imageId], answer (str or None)}]"""
    names = [f"{split}_balanced_questions.json", f"{split}_questions.json"]
    path = next((data / n for n in names if (data / n).exists() or (data / n).is_symlink()), None)  # a FIFO: refused
    if path is None:
        raise FileNotFoundError(f"{data}: no {names[0]} or {names[1]} for split {split!r}")
    doc = read_json(path, "GQA questions")
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected {{question id: {{imageId, question, answer}}}}")
    items = []
    for qid, q in doc.items():
        if not isinstance(q, dict) or not isinstance(q.get("imageId"), (str, int)) or \
                not isinstance(q.get("question"), str):
            raise ValueError(f"{path}: question {qid!r} needs an 'imageId' and a 'question' string")
        answer = q.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{path}: question {qid!r}: 'answer' is {answer!r}, expected a string")
        items.append({"id": str(qid), "sentence": q["question"], "images": [str(q["imageId"])], "answer": answer})
    if not items:  # nothing to evaluate: it would exit 0 with no metric
        raise no_items(path, split, "questions")
    unanswered = [it["id"] for it in items if it["answer"] is None]
    if unanswered and len(unanswered) < len(items):  # GQA's eval.py reads every question's answer
        raise ValueError(f"{path}: {len(unanswered)} of the {len(items)} questions have no 'answer', e.g. question "
                         f"{unanswered[0]!r}; a split is labelled whole (val, testdev) or not at all (test)")
    return items


class GQATask(SentenceImagesTask):
    name = "gqa"
    default_splits = ("testdev",)
    official_task_id = 15  # TASK15
    default_lr = 4e-5
    default_max_seq_length = 26
    default_batch_size = 128
    val_split = "val"  # official: minval
    head_name = "gqa"  # vil_prediction_gqa
    head_kind = "answer"

    def __init__(self, opts):
        super().__init__(opts)
        x = opts.extra
        self.train_split = ",".join(split_names(x.get("train_split") or "train"))  # "train,val": each once
        if x.get("answers"):
            answers = load_answer_list(Path(x["answers"]))
        else:
            counts = Counter(it["answer"] for split in self.train_split.split(",")
                             for it in load_gqa_split(self.data, split) if it["answer"])
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            answers = [a for a, _ in ranked[: int(x.get("num_answers") or 1533)]]
        if not answers:
            raise ValueError(f"{self.data}: the {self.train_split} questions give no 'answer' to build a vocabulary "
                             "from (pass --answers)")
        self.labels = tuple(answers)
        self.index = {a: i for i, a in enumerate(self.labels)}
        if is_main():  # under torchrun one process writes it
            keep_answer_list(Path(opts.out) / "answers.json", self.labels)
        log.info("gqa: %d answers", len(self.labels))

    def settings(self) -> dict:
        return answers_settings(self.labels)

    def load_split(self, split: str) -> list[dict]:
        items = load_gqa_split(self.data, split)
        for it in items:
            it["label"] = self.index.get(it["answer"])  # None: unanswered, or outside the vocabulary
        return items

    def loss(self, model, batch):
        logits = self.logits(model, batch)
        targets = F.one_hot(batch["labels"], len(self.labels)).to(logits.dtype)  # (B, A)
        return F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]  # official: mean x A

    def scored(self, item: dict) -> bool:
        return item["answer"] is not None  # an answer outside the vocabulary is a miss, not skipped

    def correct(self, item: dict, k: int) -> bool:
        return self.labels[k] == item["answer"]  # exact match, as GQA's eval.py

    def prediction(self, item: dict, k: int) -> dict:
        return {"questionId": item["id"], "prediction": self.labels[k]}
