"""VL-BERT's objective on the data side (pipelines/data/masking.py, batching.py) and its text-only
corpus (pipelines/data/text_corpus.py): hand-computed masks, the whole-image element, soft targets,
64-token sequences, the mixing ratio, exact resume and unreadable files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines.data.batching import BatchBuilder
from pipelines.data.masking import IGNORE_INDEX, mask_corpus_text, mask_regions, vlbert_image_weights
from pipelines.data.samples import RegionSample
from pipelines.data.shards import ErrorCounter
from pipelines.data.text_corpus import (
    TextCorpus,
    TextMixer,
    TextStream,
    append_text_rows,
    expand_text_corpus,
    read_text_lines,
    rows_before,
)
from pipelines.data.tokenization import CaptionTokenizer, load_tokenizer

from shards import WORDS, write_vocab

MASK = 4  # [MASK] in tests/shards.py's vocabulary


class Draws:
    """A generator whose uniforms are given: random() returns them in order, reshaped."""

    def __init__(self, values, integers=7):
        self.values, self.k = np.asarray(values, float), integers

    def random(self, shape):
        n = int(np.prod(shape))
        out, self.values = self.values[:n].reshape(shape), self.values[n:]
        return out

    def integers(self, low, high, size=None):
        return np.full(size, self.k)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CaptionTokenizer(load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")))


def test_region_masking_by_hand_no_overlap_rule():
    # region draws: 0.01 -> masked and replaced (0.01 / 0.15 < 0.9); 0.14 -> masked, feature kept
    # (0.93 >= 0.9); 0.5 -> not masked; the 4th is padding (num_boxes 3) whatever its draw
    masked, replaced = mask_regions(np.array([3]), 4, Draws([0.01, 0.14, 0.5, 0.0]))
    assert masked.tolist() == [[True, True, False, False]]
    assert replaced.tolist() == [[True, False, False, False]]
    # whole-image weights: the real regions less the replaced one, / (3 - 1 + 1e-5), as the official
    # (no IoU rule: region 3 overlapping region 1 stays in)
    w = vlbert_image_weights(replaced, np.array([[True, True, True, False]]))
    np.testing.assert_allclose(w, [[0, 1 / (2 + 1e-5), 1 / (2 + 1e-5), 0]], rtol=1e-12)
    # everything replaced: a zero element (0 / 1e-5), as the official
    assert vlbert_image_weights(np.array([[True]]), np.array([[True]])).tolist() == [[0.0]]


def test_vlbert_batch_whole_image_excludes_replaced_regions_and_targets_are_soft(tokenizer):
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 50, 50], [0, 0, 50, 49], [60, 60, 90, 90]], np.float32)  # 0 and 1 overlap
    samples = []
    for i in range(24):
        feats = rng.random((3, 6)).astype(np.float16)
        probs = rng.dirichlet(np.ones(5), size=3).astype(np.float16)  # soft class distributions
        samples.append(RegionSample(f"k{i}", "mem", f"{WORDS[i % 30]} dog", feats, boxes, probs, (100, 100)))
    batch = BatchBuilder(tokenizer, max_regions=4, objective="vlbert", seed=3)(samples)
    assert (batch["align_labels"] == 0).all()  # no relationship task: every caption its own
    labels, replaced = batch["region_labels"].numpy().astype(bool), batch["masked_regions"].numpy()
    assert (replaced <= labels).all() and not labels[:, 0].any() and not replaced[:, 0].any()
    assert replaced.any() and (labels & ~replaced).any()  # both kinds drawn with these seeds
    feat, row = batch["image_feat"].numpy(), 0
    for b, s in enumerate(samples):
        original = s.features.astype(np.float32)
        np.testing.assert_array_equal(feat[b, 1:4], original)  # not zeroed: the model replaces them
        kept = ~replaced[b, 1:4]
        np.testing.assert_allclose(feat[b, 0], original[kept].sum(0) / (kept.sum() + 1e-5), rtol=1e-5, atol=1e-6)
        n = labels[b].sum()  # targets: the stored distributions of every masked region, replaced or kept
        np.testing.assert_array_equal(batch["region_targets"][row: row + n].numpy(),
                                      s.cls_prob[labels[b, 1:4]].astype(np.float32))
        row += n
    assert row == len(batch["region_targets"])


def test_whole_word_masking_of_corpus_rows_by_hand():
    ids = np.array([[10, 11, 12, 13, 0]])
    words = np.array([[0, 0, 1, 2, -1]])  # "dog ##s cat man" + padding
    # word draws: word 0 0.01 -> [MASK] (0.07 < 0.8); word 1 0.5 -> kept; word 2 0.125 -> random (0.83)
    masked, labels = mask_corpus_text(ids, words, Draws([0.01, 0.5, 0.125, 0.0, 0.0], integers=7), MASK, 40)
    assert masked.tolist() == [[MASK, MASK, 12, 7, 0]]
    assert labels.tolist() == [[10, 11, IGNORE_INDEX, 13, IGNORE_INDEX]]


def write_corpus(folder, lines_per_file=(8, 5)):
    """Lines of ten distinct vocabulary words each ('dogs' is two WordPieces, one word)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, lines = np.random.default_rng(0), []
    for f, n in enumerate(lines_per_file):
        text = []
        for _ in range(n):
            line = " ".join(rng.choice(WORDS[2:], size=10))
            lines.append(line)
            text.append(line)
        # blank lines and CRLF are dropped / stripped, as the official load_corpus does
        (folder / f"part-{f}.txt").write_bytes(("\r\n\n".join(text) + "\n   \n").encode())
    return lines


def test_corpus_is_cut_into_64_token_sequences_as_general_corpus(tokenizer, tmp_path):
    lines = write_corpus(tmp_path / "c")
    lines[3] = " ".join(["dogs"] + lines[3].split()[1:])  # one word, two WordPieces
    (tmp_path / "c" / "part-0.txt").write_text("\n".join(lines[:8]) + "\n")
    corpus = TextCorpus(expand_text_corpus(str(tmp_path / "c" / "*.txt")), ErrorCounter())
    assert corpus.lines == lines  # files in name order, one list
    stream = TextStream(corpus, tokenizer, seed=5)
    vocab = tokenizer.tokenizer.get_vocab()
    for index in range(len(lines) + 3):  # a second pass too
        first = stream.line_of(index)
        # the official: the start line's words, then the following lines' (wrapping) until >= 64
        # words, WordPieces, the first 64 (ten words a line: seven lines)
        words = " ".join(lines[(first + k) % len(lines)] for k in range(7)).split()
        pieces = [p for w in words for p in (["dog", "##s"] if w == "dogs" else [w])]
        ids, word_index = stream.sequence(index)
        assert ids.tolist() == [vocab[p] for p in pieces[:64]] and len(ids) == 64
        assert word_index[-1] < 64 and (np.diff(word_index) >= 0).all()
    starts = [stream.line_of(i) for i in range(len(lines))]
    assert sorted(starts) == list(range(len(lines)))  # each line once per pass
    rows = stream.rows(0, 4)
    assert rows["input_ids"].shape == (4, 64) and (rows["attention_mask"] == 1).all()
    assert tokenizer.tokenizer.cls_token_id not in rows["input_ids"]  # no [CLS] / [SEP], as the official rows
    picked = rows["lm_labels"] != IGNORE_INDEX
    assert 0 < picked.mean() < 0.4


def test_text_rows_mixed_at_the_ratio_over_n_batches(tokenizer, tmp_path):
    write_corpus(tmp_path / "c")
    stream = TextStream(TextCorpus(expand_text_corpus(tmp_path / "c"), ErrorCounter()), tokenizer, seq_len=16)
    from pipelines.synthetic.scenes import SyntheticTask

    task = SyntheticTask(feature_size=8)
    captions = [task.batch(8, np.random.default_rng(k), vlbert=True) for k in range(10)]
    for ratio, per_batch in ((1.0, [8] * 10), (0.3, None)):
        mixed = list(TextMixer(stream, ratio)(iter(captions)))
        counts = [int(b.get("text_only", torch.zeros(8, dtype=torch.bool)).sum()) for b in mixed]
        assert sum(counts) == rows_before(10, 8, ratio) == int(80 * ratio)
        assert max(counts) - min(counts) <= 1  # spread evenly
        if per_batch:
            assert counts == per_batch  # the official ratio: as many text rows as caption rows
    b = mixed[0] if "text_only" in mixed[0] else mixed[1]
    B = int((~b["text_only"]).sum())
    assert b["input_ids"].shape[1] == 16 and (b["image_mask"][B:] == 0).all() and (b["region_labels"][B:] == 0).all()
    assert (b["lm_labels"][:B, 5:] == IGNORE_INDEX).all()  # captions padded with ignored labels


def test_text_stream_resumes_exactly_and_ranks_take_disjoint_rows(tokenizer, tmp_path):
    write_corpus(tmp_path / "c")
    corpus = TextCorpus(expand_text_corpus(tmp_path / "c"), ErrorCounter())
    captions = [{"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5, dtype=torch.long),
                 "lm_labels": torch.full((4, 5), IGNORE_INDEX), "token_type_ids": torch.zeros(4, 5, dtype=torch.long),
                 "align_labels": torch.zeros(4, dtype=torch.long), "keys": []} for _ in range(7)]

    def text(start, n, seed=0, rank=0, world=1):
        mixer = TextMixer(TextStream(corpus, tokenizer, seed=seed, rank=rank, world_size=world), 0.75, start)
        return [(b["keys"], b["input_ids"][4:].tolist(), b["lm_labels"][4:].tolist())
                for b in mixer(iter(captions[:n]))]

    whole = text(0, 7)
    assert text(0, 3) + text(3, 4) == whole  # interrupted after 3 caption batches, then resumed
    assert text(0, 7, seed=1) != whole
    r0, r1 = text(0, 4, rank=0, world=2), text(0, 4, rank=1, world=2)
    keys0, keys1 = {k for b in r0 for k in b[0]}, {k for b in r1 for k in b[0]}
    assert keys0.isdisjoint(keys1) and len(keys0) == len(keys1) == rows_before(4, 4, 0.75)


def test_unreadable_files_are_skipped_and_counted_never_waited_on(tokenizer, tmp_path):
    folder = tmp_path / "c"
    lines = write_corpus(folder, (3,))
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (folder / "subdir").mkdir()
    os.mkfifo(folder / "fifo.txt")  # opening it for reading would wait for a writer
    errors = ErrorCounter()
    with pytest.warns(Warning, match="skipping text file"):
        corpus = TextCorpus(expand_text_corpus(str(folder)), errors)
    assert corpus.lines == lines
    assert errors.counts()["unreadable_text_files"] == 4
    if os.geteuid() != 0:  # root reads anything
        locked = folder / "locked.txt"
        locked.write_text("dog cat\n")
        locked.chmod(0)
        with pytest.raises(PermissionError):
            read_text_lines(locked)
    with pytest.raises(ValueError, match="none of the"):
        TextCorpus([folder / "binary.txt", folder / "subdir"], ErrorCounter())
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_text_corpus(str(tmp_path / "nothing-*.txt"))


def test_append_text_rows_keeps_compact_targets_and_caption_rows():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "lm_labels": torch.full((2, 3), IGNORE_INDEX), "token_type_ids": torch.zeros(2, 3, dtype=torch.long),
             "image_feat": torch.ones(2, 4, 5), "image_loc": torch.ones(2, 4, 5), "image_mask": torch.ones(2, 4),
             "region_labels": torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]]), "region_targets": torch.rand(3, 7),
             "masked_regions": torch.zeros(2, 4, dtype=torch.bool), "align_labels": torch.zeros(2, dtype=torch.long),
             "keys": ["a", "b"]}
    text = {"input_ids": np.full((1, 6), 9), "attention_mask": np.ones((1, 6), np.int64),
            "lm_labels": np.full((1, 6), IGNORE_INDEX), "keys": ["text:0"]}
    out = append_text_rows(batch, text)
    assert out["input_ids"].tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[9] * 6]
    assert out["text_only"].tolist() == [False, False, True] and out["keys"] == ["a", "b", "text:0"]
    assert out["region_targets"] is batch["region_targets"] and out["image_feat"].shape == (3, 4, 5)
    assert out["attention_mask"][:2, 3:].sum() == 0


def test_vlbert_captions_mask_whole_words_never_specials(tokenizer):
    rng = np.random.default_rng(1)
    samples = [RegionSample(f"k{i}", "mem", "dogs running " * 4, rng.random((3, 6)).astype(np.float16),
                            np.array([[0, 0, 5, 5]] * 3, np.float32), np.full((3, 5), 0.2, np.float16), (10, 10))
               for i in range(200)]
    batch = BatchBuilder(tokenizer, max_regions=3, objective="vlbert", seed=0)(samples)
    ids, labels = batch["input_ids"].numpy(), batch["lm_labels"].numpy()
    vocab = tokenizer.tokenizer.get_vocab()
    picked = labels != IGNORE_INDEX
    assert not picked[:, 0].any()  # [CLS]
    lengths = batch["attention_mask"].numpy().sum(1)
    assert not picked[np.arange(len(ids)), lengths - 1].any()  # [SEP]
    dog, s = vocab["dog"], vocab["##s"]
    original = np.where(picked, labels, ids)
    starts = np.argwhere(original[:, :-1] == dog)
    # "dogs" = dog ##s: both WordPieces picked, or neither
    assert all(picked[b, t] == picked[b, t + 1] for b, t in starts if original[b, t + 1] == s)
    assert 0.10 < picked[:, 1:].sum() / (lengths - 2).sum() < 0.20
