"""Visual Commonsense Reasoning in its released files, as vilbert-multi-task fine-tunes it (TASK5
VCR_Q-A and TASK6 VCR_QA-R, `vcr_dataset.py`).

    DATA/{train,val,test}.jsonl     one JSON object a line: "annot_id" ("val-0"), "img_fn"
                                    ("lsmdc_.../....jpg"), "metadata_fn", "objects" (class names,
                                    "person" for people), "question", "answer_choices" (4),
                                    "rationale_choices" (4), "answer_label", "rationale_label"
                                    (0-3; test.jsonl has no labels)
    DATA/unisex_names_table.csv     the names given to people (vilbert-multi-task's datasets/VCR copy
                                    of fivethirtyeight's table: the `name` column)
    DATA/vcr1images/METADATA_FN     each image's boxes and names; read only by `gt_boxes_json`

A question or choice is a list of tokens: a word, or a list of indices into `objects`. As the
official loader: each "person" object gets a name drawn from the names table, any other keeps its
class name; an index list becomes those words, one per index ([0, 2] -> "Casey Riley"). The names
are drawn once per question and sub-task (here from a generator seeded by `--seed` and the
annot_id, so a question gets the same names in every epoch and run, as the official cached entries
do). The words are joined by spaces and tokenized; the official code then joins the word pieces
with spaces and tokenizes that again (a word split into pieces reaches the model as "star # # s"),
and so does this module, so that released checkpoints see the text they were trained on.

Each question gives 4 inputs per sub-task: Q->A reads `[CLS] question [SEP] answer_i [SEP]`, QA->R
`[CLS] question [SEP] right answer [SEP] rationale_i [SEP]` (segment 0 up to the first [SEP], 1
after it); the choice is cut to fit (60 tokens for Q->A, 80 for QA->R unless `--max-seq-length`);
a first part of max - 3 tokens or more is cut to max - 4, leaving the choice one token (the
official loader gives the choice none at max - 3 and stops beyond it). One score per input from
the official `vil_logit` (a linear layer on h_IMG * h_CLS, which vilbert-multi-task shares with
retrieval: our head "retrieval"), softmax over the 4, cross-entropy. Each fine-tuning step takes
`--batch-size` questions for each sub-task and adds the two losses (official: one batch per task,
gradients summed); task tokens 5 and 6.

Regions: the detected regions of the image (`--features`, looked up by the exact key
vilbert-extract gives `img_fn`: its path without the extension, other characters as "_"), and with
`--gt-boxes` the regions of the annotated boxes (shards from `vilbert-extract --gt-boxes` on
`gt_boxes_json`'s file), combined as the official code does: [IMG] = the mean of the two [IMG]
features weighted by their counts (N_det + 1 and N_gt + 1), then the detected regions, then the
ground-truth ones; within `--max-regions` the ground-truth regions are kept first.

A VL-BERT model reads VCR as the official VL-BERT code prepares it (`pipelines.tasks.vcr_vlbert`:
its 13 names, "and" between the objects of one reference, one tokenization, its layout and
truncation), and its regions as the official VL-BERT VCR boxes: the whole image ([IMG], the same
mean as above), then the ground-truth regions in the order of `objects` (no detections; without
`--gt-boxes` the detections, as for ViLBERT). Each word piece naming an object carries that
object's region (`text_visual_index`: the region of object k is element 1 + k); a word of no
object, or of an object whose region `--max-regions` cut or that `--gt-boxes` does not give,
carries the whole image (element 0). Its head: Dropout + Linear on the pooled [CLS], BCE per choice.

Metrics (val): q2a, qa2r (the rationale given the right answer) and q2ar (both right), as
`script/VCR_Q_AR_evaluation.py`; a question's pick is its first highest-scoring choice. A split
without labels (test) is answered, not scored: each question's answer probabilities and its
rationale probabilities given each of the 4 answers (the leaderboard's 5 x 4 groups).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import Task, log
from .features import FeatureStore, locations, pad_regions, with_img_token
from .metrics import check_finite_items, vcr_accuracies
from .vcr_data import (  # noqa: F401 (image_key: part of this module's interface)
    CHOICES,
    NAMES_TABLE,
    gt_boxes_json,
    image_key,
    load_vcr_split,
    object_names,
    object_words,
    read_names_table,
)
from .vcr_vlbert import WORD_BUDGET, first_name, person_names, vlbert_rows

SUBTASKS = ("q2a", "qa2r")


class VCRTask(Task):
    name = "vcr"
    default_splits = ("val",)
    official_task_id = 5  # TASK5 VCR_Q-A; QA->R is TASK6
    qa2r_task_id = 6
    default_lr = 2e-5
    default_epochs = 10
    default_batch_size = 64  # questions, for each sub-task
    metric = "q2ar"
    default_max_seq_length = 80  # VCR_QA-R; VCR_Q-A reads 60
    q2a_max_seq_length = 60
    shown_max_seq_length, shown_task_id = "60/80", "5/6"  # Q->A / QA->R, in --help

    def __init__(self, opts):
        self.length_given = opts.max_seq_length is not None
        super().__init__(opts)
        self.load_common()
        self.names_table = read_names_table(self.data / NAMES_TABLE)
        gt = opts.extra.get("gt_features")
        self.gt_store = FeatureStore(gt) if gt else None
        if self.gt_store is None:
            log.warning("vcr without --gt-boxes: the regions are the detections only (vilbert-multi-task "
                        "adds the annotated boxes of the objects the text refers to)")
        self._train = None

    def prepare(self, model) -> None:
        super().prepare(model)
        if self.arch == "vlbert" and self.gt_store is None:
            log.warning("vcr on a VL-BERT without --gt-boxes: no object has a region, so every word carries the "
                        "whole image (the official VL-BERT gives an object's words its box)")

    @property
    def head_name(self) -> str:
        """ViLBERT: the official vil_logit, shared by retrieval and VCR; VL-BERT: its own VCR head."""
        return "vcr" if self.arch == "vlbert" else "retrieval"

    def head(self):
        if self.arch == "vlbert":  # VL-BERT's final_mlp: Dropout + Linear on the pooled [CLS]
            return (self.head_name, "cls_linear", 1)
        return (self.head_name, "pooled_linear", 1)

    def max_length(self, subtask: str) -> int:
        if subtask == "q2a" and not self.length_given:
            return min(self.q2a_max_seq_length, self.opts.max_seq_length)
        return self.opts.max_seq_length

    # -- text ------------------------------------------------------------------------------
    def names(self, item: dict, subtask: str) -> list[str]:
        """The words of the item's objects for one sub-task: the same in every epoch and run (seed);
        a VL-BERT's from the official 13 names, the people in turn from a drawn first one."""
        rng = np.random.default_rng([self.opts.seed, zlib.crc32(item["id"].encode()), SUBTASKS.index(subtask)])
        if self.arch == "vlbert":
            return person_names(item["objects"], first_name(rng))
        return object_names(item["objects"], self.names_table, rng)

    @property
    def word_budget(self) -> int:
        """VL-BERT: the words of a row, [CLS] and the two [SEP] not counted (official 64)."""
        return max(2, self.opts.max_seq_length - 3) if self.length_given else WORD_BUDGET

    def token_ids(self, words: list[str]) -> list[int]:
        """Words -> ids as the official loader: tokenized, word pieces joined by spaces, tokenized again."""
        pieces = self.tokenizer.tokenize(" ".join(words))
        return self.tokenizer(" ".join(pieces), add_special_tokens=False)["input_ids"] if pieces else []

    def pair(self, first: list[int], second: list[int], max_length: int) -> tuple[list[int], list[int]]:
        """[CLS] first [SEP] second [SEP] -> (ids, segment ids); the second part is cut to fit."""
        first = first[:max(0, max_length - 4)]
        second = second[:max(0, max_length - 3 - len(first))]
        ids = [self.tokenizer.cls_token_id, *first, self.tokenizer.sep_token_id, *second, self.tokenizer.sep_token_id]
        return ids, [0] * (len(first) + 2) + [1] * (len(second) + 1)

    def inputs(self, item: dict, subtask: str, answer: int | None = None) -> list[tuple[list[int], ...]]:
        """The 4 (ids, segments) of a question: its answers (q2a), or its rationales after the
        answer `answer` (qa2r; default its right answer). A VL-BERT's: (ids, segments, tags), its
        own text (`vcr_vlbert.vlbert_rows`)."""
        names = self.names(item, subtask)
        if self.arch == "vlbert":
            return vlbert_rows(self.tokenizer, item, subtask, answer, names, self.word_budget)
        first = object_words(item["question"], names)
        if subtask == "q2a":
            choices = item["answers"]
        else:
            first = first + ["[SEP]"] + object_words(item["answers"][item["answer_label"] if answer is None
                                                                     else answer], names)
            choices = item["rationales"]
        a = self.token_ids(first)
        return [self.pair(a, self.token_ids(object_words(c, names)), self.max_length(subtask)) for c in choices]

    # -- regions ---------------------------------------------------------------------------
    def regions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """-> features (R, F), locations (R, 5): [IMG], detected, ground-truth (see the module doc)."""
        return self.regions_and_objects(key)[:2]

    def regions_and_objects(self, key: str) -> tuple[np.ndarray, np.ndarray, int, int]:
        """-> features (R, F), locations (R, 5), the element of object 0's ground-truth region and how
        many objects have theirs (object k < that count is element first + k). A VL-BERT: no detections
        when there are ground-truth regions (the official VCR boxes are the whole image and the objects)."""
        r = self.store.get(key)
        if self.gt_store is None:
            n = self.opts.max_regions - 1
            return (*with_img_token(r.features[:n], r.boxes[:n], r.width, r.height), 1, 0)
        g = self.gt_store.get(key)
        n_det, n_gt = len(r.features), len(g.features)
        img = (r.features.mean(0) * (n_det + 1) + g.features.mean(0) * (n_gt + 1)) / (n_det + n_gt + 2)
        keep_gt = min(self.opts.max_regions - 1, n_gt)
        keep_det = 0 if self.arch == "vlbert" else min(self.opts.max_regions - keep_gt, n_det + 1) - 1  # ([IMG] counts)
        feats = np.concatenate([img[None], r.features[:keep_det], g.features[:keep_gt]]).astype(np.float32)
        loc = np.concatenate([np.array([[0, 0, 1, 1, 1]], np.float32),
                              locations(r.boxes[:keep_det], r.width, r.height),
                              locations(g.boxes[:keep_gt], g.width, g.height)])
        return feats, loc, 1 + keep_det, keep_gt

    # -- batches ---------------------------------------------------------------------------
    def make_batch(self, entries: list[tuple[dict, str, int | None]]) -> dict:
        """entries: (item, subtask, answer or None) -> 4 rows each, an entry's rows consecutive:
        input_ids / token_type_ids / attention_mask (4E, T), image tensors (4E, R, ...),
        qa2r (4E,) bool, labels (E,) (-1 when unlabelled); a VL-BERT's also text_visual_index
        (4E, T): the visual element of each word (its object's region, else 0, the whole image)."""
        rows = [row for item, subtask, answer in entries for row in self.inputs(item, subtask, answer)]
        T = max(len(row[0]) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        segments = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for k, (ids, seg, *_) in enumerate(rows):
            input_ids[k, :len(ids)] = torch.tensor(ids)
            segments[k, :len(seg)] = torch.tensor(seg)
            mask[k, :len(ids)] = 1
        keys = [item["key"] for item, _, _ in entries]
        unique = sorted(set(keys))
        layouts = [self.regions_and_objects(k) for k in unique]
        feat, loc, image_mask = pad_regions([(f, lc) for f, lc, _, _ in layouts])  # (U, R, F), (U, R, 5), (U, R)
        index = torch.tensor([unique.index(k) for k in keys]).repeat_interleave(CHOICES)  # (4E,)
        extra = {}
        if self.arch == "vlbert":  # tag t > 0 = object t - 1: its region's element, if it has one
            visual = torch.zeros(len(rows), T, dtype=torch.long)  # (4E, T)
            for k, (*_, tags) in enumerate(rows):
                _, _, first, n_objects = layouts[index[k]]
                visual[k, :len(tags)] = torch.tensor([first + t - 1 if 0 < t <= n_objects else 0 for t in tags])
            extra["text_visual_index"] = visual
        labels = []
        for item, subtask, _ in entries:
            label = item["answer_label" if subtask == "q2a" else "rationale_label"]
            labels.append(-1 if label is None else label)
        qa2r = torch.tensor([subtask == "qa2r" for _, subtask, _ in entries]).repeat_interleave(CHOICES)
        return {"input_ids": input_ids, "token_type_ids": segments, "attention_mask": mask,
                "image_feat": feat[index], "image_loc": loc[index], "image_mask": image_mask[index],
                "qa2r": qa2r, "labels": torch.tensor(labels), **extra}

    def backbone(self, model, batch):
        ids = batch["input_ids"]
        task_ids = None
        if model.config.task_specific_tokens:  # 5 for Q->A rows, 6 for QA->R rows (or --task-token)
            if self.opts.task_token is not None:
                task_ids = torch.full((ids.shape[0], 1), self.opts.task_token, dtype=torch.long, device=ids.device)
            else:
                task_ids = torch.where(batch["qa2r"], self.qa2r_task_id, self.official_task_id)[:, None].long()
        extra = {"text_visual_index": batch["text_visual_index"]} if "text_visual_index" in batch else {}
        return model.backbone(ids, batch["image_feat"], batch["image_loc"], batch["token_type_ids"],
                              batch["attention_mask"], batch["image_mask"], task_ids, **extra)

    def scores(self, model, batch) -> torch.Tensor:
        """(E, 4) one score per choice."""
        return model.task_logits(self.head_name, self.backbone(model, batch))[:, 0].view(-1, CHOICES)

    # -- training --------------------------------------------------------------------------
    def train_items(self) -> list[dict]:
        if self._train is None:
            items = [it for it in load_vcr_split(self.data, "train") if it["answer_label"] is not None]
            if not items:
                raise ValueError(f"{self.data / 'train.jsonl'}: no labelled question")
            self.check_regions(items, "train")
            self._train = items
            log.info("vcr train: %d questions", len(items))
        return self._train

    def collate(self, items, rng):
        """The questions once for Q->A and once for QA->R (an epoch is one pass of each sub-task)."""
        return self.make_batch([(item, subtask, None) for subtask in SUBTASKS for item in items])

    def loss(self, model, batch):
        scores = self.scores(model, batch).float()  # (E, 4)
        qa2r = batch["qa2r"][::CHOICES]  # (E,)
        if self.arch == "vlbert":  # VL-BERT (CLASSIFIER_SIGMOID): each choice right or not, BCE
            right = F.one_hot(batch["labels"], CHOICES).float()  # (E, 4)
            per_item = F.binary_cross_entropy_with_logits(scores, right, reduction="none").mean(1)  # (E,)
        else:
            per_item = F.cross_entropy(scores, batch["labels"], reduction="none")  # (E,)
        return sum(per_item[qa2r == flag].mean() for flag in (False, True) if (qa2r == flag).any())

    # -- evaluation ------------------------------------------------------------------------
    def check_regions(self, items: list[dict], split: str) -> None:
        keys = sorted({it["key"] for it in items})
        for store in [self.store] + ([self.gt_store] if self.gt_store is not None else []):
            missing = [k for k in keys if k not in store.members]  # exact keys: no trailing-number guess
            if missing:
                broken = f" (unreadable shards: {'; '.join(store.unreadable)})" if store.unreadable else ""
                raise KeyError(f"{store.folder}: no features for {len(missing)} {split} images, e.g. "
                               f"{missing[:5]} (keys of img_fn){broken}")

    def has_labels(self, split: str) -> bool:
        return any(it["answer_label"] is not None for it in load_vcr_split(self.data, split))

    def eval_inputs(self, split: str) -> list[dict]:
        items = load_vcr_split(self.data, split)
        self.check_regions(items, split)
        return items

    def eval_chunks(self, items: list[dict]):
        """Consecutive questions, at most --eval-batch-size input rows together (8 per labelled
        question, 20 per unlabelled one; at least one question)."""
        chunk, rows = [], 0
        for it in items:
            n = CHOICES * (2 if it["answer_label"] is not None else 1 + CHOICES)
            if chunk and rows + n > self.opts.eval_batch_size:
                yield chunk
                chunk, rows = [], 0
            chunk.append(it)
            rows += n
        if chunk:
            yield chunk

    @torch.no_grad()
    def evaluate(self, model, split):
        items = self.eval_inputs(split)
        model.eval()

        def build(chunk):
            entries = []
            for it in chunk:
                entries.append((it, "q2a", None))
                entries += [(it, "qa2r", a) for a in ([None] if it["answer_label"] is not None else range(CHOICES))]
            return self.make_batch(entries)

        def run(chunk, batch):
            scores = self.scores(model, batch).float().cpu()  # (E, 4)
            out, k = [], 0
            for it in chunk:
                n = 1 if it["answer_label"] is not None else CHOICES
                out.append((scores[k], scores[k + 1] if n == 1 else scores[k + 1:k + 1 + n]))
                k += 1 + n
            return out

        # (N, 4) answer scores; (N, 4) rationale scores given the right answer, or (N, 4, 4) given each
        outputs = self.map_chunks(list(self.eval_chunks(items)), build, run)
        answer_probs, rationale_probs = [a for a, _ in outputs], [r for _, r in outputs]
        unlabelled = [k for k, it in enumerate(items) if it["answer_label"] is None]  # the labelled: vcr_accuracies
        check_finite_items([bool(torch.isfinite(answer_probs[k]).all() and torch.isfinite(rationale_probs[k]).all())
                            for k in unlabelled], [items[k]["id"] for k in unlabelled], f"vcr {split}", "questions")
        labelled = [k for k, it in enumerate(items) if it["answer_label"] is not None]
        metrics = {"count": len(items), "scored": len(labelled)}
        if labelled:
            metrics.update(vcr_accuracies(torch.stack([answer_probs[k] for k in labelled]),
                                          [items[k]["answer_label"] for k in labelled],
                                          torch.stack([rationale_probs[k] for k in labelled]),
                                          [items[k]["rationale_label"] for k in labelled],
                                          ids=[items[k]["id"] for k in labelled]))
        preds = []
        for it, a, r in zip(items, answer_probs, rationale_probs):
            p = {"annot_id": it["id"], "answer_probs": [round(v, 6) for v in a.softmax(-1).tolist()]}
            if it["answer_label"] is None:  # the leaderboard's rationale_conditioned_on_a0..a3
                p["rationale_probs"] = [[round(v, 6) for v in row] for row in r.softmax(-1).tolist()]
            else:
                p.update({"answer": int(np.argmax(a.numpy())), "answer_label": it["answer_label"],
                          "rationale_probs": [round(v, 6) for v in r.softmax(-1).tolist()],
                          "rationale": int(np.argmax(r.numpy())), "rationale_label": it["rationale_label"]})
                p["q2ar"] = p["answer"] == p["answer_label"] and p["rationale"] == p["rationale_label"]
            preds.append(p)
        return metrics, preds


def main(argv=None):
    """python -m pipelines.tasks.vcr DATA BOXES.json: the --gt-boxes file of vilbert-extract for VCR."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("data", type=click.Path(exists=True, file_okay=False))
    @click.argument("out", type=click.Path(dir_okay=False))
    def write(data, out):
        """Write {img_fn: [[x1, y1, x2, y2], ...]} from the VCR metadata of DATA's jsonl files."""
        try:
            boxes = gt_boxes_json(Path(data))
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        Path(out).write_text(json.dumps(boxes))
        click.echo(f"{out}: boxes of {len(boxes)} images")

    return write.main(args=argv, prog_name="python -m pipelines.tasks.vcr", standalone_mode=argv is None)


if __name__ == "__main__":
    main()
