"""VCR's text as jackroos/VL-BERT prepares it, for a VL-BERT model on `vilbert-eval --task vcr`
(a ViLBERT keeps vilbert-multi-task's text, `pipelines.tasks.vcr`). Read from the official
`vcr/data/datasets/vcr.py: VCRDataset` (`retokenize_and_convert_to_ids_with_tag`, `__getitem__`) and
`vcr/modules/resnet_vlbert_for_vcr.py` (`prepare_text_from_qa`, `_collect_obj_reps`), with the settings
of `cfgs/vcr/base_{q2a,qa2r}_4x16G_fp32.yaml` (BASIC_ALIGN false, ADD_IMAGE_AS_A_BOX true,
ONLY_USE_RELEVANT_DETS false; the defaults QA2R_NOQ, ANSWER_FIRST, QA_ONE_SENT, NO_GROUNDING false):

* Names: each "person" object gets the next of 13 gender-neutral names, in turn (a 14th person
  gets the first again); any other object keeps its class name ("diningtable"). The official
  dataset keeps one running counter over all the items it loads (so a question's first name
  depends on the loading order and the worker); here the first name is drawn per question and
  sub-task from `--seed` and the annot_id, and the people follow it in turn.
* Words: each word of the line is tokenized once (no second tokenization). An index list becomes
  its objects' words joined by "and" ([0, 2] -> "casey and riley").
* Tags: each word piece of an object's word is tagged with that object (its index + 1; 0 is the
  whole image, ADD_IMAGE_AS_A_BOX); other words, "and", [CLS] and [SEP] get 0. A word carries
  the visual feature of the element its tag names (`_collect_obj_reps`).
* Layout: Q->A `[CLS] question [SEP] answer [SEP]`; QA->R `[CLS] question answer [SEP] rationale
  [SEP]` (the question and the right answer are one sentence, no [SEP] between them); segment 0 up
  to and with the first [SEP], 1 after it.
* Truncation: the words of a row without [CLS] and the two [SEP] fit in 64 (VCRDataset's seq_len,
  which the configs leave at its default; `--max-seq-length N` gives N - 3). Q->A: while question +
  answer is too long, the longer of the two loses its last piece (the question when they are equal);
  the question is one list for the 4 answers, so what it lost for one answer it has lost for all.
  QA->R: the rationale loses pieces while it is longer than question + answer, else the question
  (down to one piece), else the answer. An unlabelled question's QA->R rows (`--split test`, the
  rationales after each answer) are not cut, as the official test mode.
"""
from __future__ import annotations

import numpy as np

GENDER_NEUTRAL_NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody",
                        "Kendall", "Frankie", "Pat", "Quinn")
WORD_BUDGET = 64  # VCRDataset(seq_len=64): the words of a row, [CLS] and [SEP]s not counted


def person_names(objects: list[str], first: int) -> list[str]:
    """The word of each object: the people named in turn from GENDER_NEUTRAL_NAMES starting at
    index `first`, any other object its class name."""
    names, person = [], 0
    for name in objects:
        if name == "person":
            name = GENDER_NEUTRAL_NAMES[(first + person) % len(GENDER_NEUTRAL_NAMES)]
            person += 1
        names.append(name)
    return names


def first_name(rng: np.random.Generator) -> int:
    return int(rng.integers(len(GENDER_NEUTRAL_NAMES)))


def tagged_pieces(tokenizer, tokens: list, names: list[str]) -> list[tuple[int, int]]:
    """VCR tokens -> [(word-piece id, tag)]: a word tokenized alone, tag 0; an index list [i, j, ...]
    the pieces of names[i] (tag i + 1), then "and" (tag 0) and the pieces of names[j] (tag j + 1), ..."""
    pieces: list[tuple[str, int]] = []
    for token in tokens:
        if isinstance(token, str):
            pieces += [(p, 0) for p in tokenizer.tokenize(token)]
            continue
        for n, obj in enumerate(token):
            if n:
                pieces.append(("and", 0))
            pieces += [(p, obj + 1) for p in tokenizer.tokenize(names[obj])]
    ids = tokenizer.convert_tokens_to_ids([p for p, _ in pieces])
    return [(i, tag) for i, (_, tag) in zip(ids, pieces)]


def cut_q2a(question: list, answers: list[list], budget: int) -> None:
    """In place, the official Q->A rule (the question shared by the 4 answers, cut in turn)."""
    for answer in answers:
        while len(question) + len(answer) > budget:
            (answer if len(answer) > len(question) else question).pop()


def cut_qa2r(question: list, answer: list, rationales: list[list], budget: int) -> None:
    """In place, the official QA->R rule (question and answer shared by the 4 rationales)."""
    for rationale in rationales:
        while len(question) + len(answer) + len(rationale) > budget:
            if len(rationale) > len(question) + len(answer):
                rationale.pop()
            elif len(question) > 1:
                question.pop()
            else:
                answer.pop()


def vlbert_rows(tokenizer, item: dict, subtask: str, answer: int | None, names: list[str],
                budget: int) -> list[tuple[list[int], list[int], list[int]]]:
    """The 4 (ids, segments, tags) of a question for one sub-task: its answers (q2a), or its
    rationales after answer `answer` (qa2r; None = the right one). `budget` >= 2: the words of a row."""
    question = tagged_pieces(tokenizer, item["question"], names)
    if subtask == "q2a":
        choices = [tagged_pieces(tokenizer, c, names) for c in item["answers"]]
        cut_q2a(question, choices, budget)
        first = question
    else:
        given = tagged_pieces(tokenizer, item["answers"][item["answer_label"] if answer is None else answer], names)
        choices = [tagged_pieces(tokenizer, c, names) for c in item["rationales"]]
        if item["answer_label"] is not None:  # the official test mode (no labels) cuts nothing
            cut_qa2r(question, given, choices, budget)
        first = question + given
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = []
    for choice in choices:
        ids = [cls, *(i for i, _ in first), sep, *(i for i, _ in choice), sep]
        tags = [0, *(t for _, t in first), 0, *(t for _, t in choice), 0]
        rows.append((ids, [0] * (len(first) + 2) + [1] * (len(choice) + 1), tags))
    return rows
