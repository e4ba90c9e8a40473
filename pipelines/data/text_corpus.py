"""VL-BERT's text-only corpus (`vilbert-train --text-corpus 'corpus/*.txt'`): plain UTF-8 text
files cut into sequences of 64 WordPiece tokens as the official `general_corpus` dataset does, and
mixed into the caption batches as extra rows trained with masked language modelling.

Format: UTF-8 text, one passage (a sentence, a paragraph) per line; blank lines are dropped and
each line is stripped. All files are read into memory, in the order of their sorted names, as one
list of lines (the official `load_corpus` joins its `+`-separated files so). Sequence k starts at a
line drawn without replacement per pass over the lines (a fresh permutation each pass, as a
shuffling sampler), takes that line's words and those of the following lines (wrapping at the
end) until it has `min_words` (64) words, masks whole words (masking.mask_corpus_text) and keeps
the first `seq_len` (64) WordPieces, with no [CLS]/[SEP] (as the official rows). A long line is cut
to its first max(min_words, seq_len) whitespace words before it is tokenized: the row is the same, and
a corpus without newlines no longer costs a whole-line tokenization per row.

A file that cannot be read as UTF-8 text (binary, another encoding, permission denied, a directory,
a FIFO or other special file: never opened for reading, so never waited on) is skipped with a
warning and counted (`unreadable_text_files`), like a corrupt shard.

Every row is a pure function of (seed, its global index): DDP process r of w takes the indices
k * w + r, and a resumed run starts at the row the step reached (`rows_before`), so the text stream
resumes exactly.
"""
from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vilbert import IGNORE_INDEX

from .masking import mask_corpus_text

SEQ_LEN = 64  # general_corpus SEQ_LEN in cfgs/pretrain/base_prec_4x16G_fp32.yaml
MIN_WORDS = 64  # MIN_SEQ_LEN there: words gathered before WordPiece and truncation
TEXT_RATIO = 1.0  # text-only rows per caption row: BATCH_IMAGES [32, 32] there (one batch of each per step)


def expand_text_corpus(pattern: str | os.PathLike) -> list[Path]:
    """A glob pattern ('corpus/*.txt', '**' recurses), a directory (its entries) or a file -> paths,
    sorted; FileNotFoundError when nothing matches."""
    pattern = str(pattern)
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, name) for name in os.listdir(pattern)]
    else:
        paths = glob.glob(pattern, recursive=True)
    if not paths:
        raise FileNotFoundError(f"--text-corpus {pattern!r}: no file matches")
    return [Path(p) for p in sorted(paths)]


def read_text_lines(path: Path) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file; OSError or ValueError with the reason
    when it is not one. A special file is refused before it is read (opened non-blocking)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ValueError(kind)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    if b"\x00" in data:
        raise ValueError("binary (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error})") from None
    return [line.strip() for line in text.split("\n") if line.strip()]


class TextCorpus:
    """The lines of every readable file; `errors` (a shards.ErrorCounter) counts the skipped ones."""

    def __init__(self, paths: list[Path], errors):
        self.paths, self.lines = list(paths), []
        for path in self.paths:
            try:
                self.lines += read_text_lines(path)
            except (OSError, ValueError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                errors.add("unreadable_text_files", f"skipping text file {path}: {reason}")
        if not self.lines:
            raise ValueError(f"--text-corpus: none of the {len(self.paths)} file(s) holds a line of UTF-8 text "
                             f"(skipped: {errors.counts().get('unreadable_text_files', 0)} unreadable)")


class TextStream:
    """Masked text-only rows: `rows(start, n)` -> dict of (n, seq_len) arrays for the rows
    start, ..., start + n - 1 of this process (global index k * world_size + rank)."""

    def __init__(self, corpus: TextCorpus, tokenizer, seq_len: int = SEQ_LEN, min_words: int = MIN_WORDS,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or min_words < 1:
            raise ValueError(f"text sequences need seq_len and min_words >= 1, got {seq_len}, {min_words}")
        self.lines, self.tokenizer = corpus.lines, tokenizer  # a CaptionTokenizer (its .tokenizer, mask id)
        self.seq_len, self.min_words, self.seed = seq_len, min_words, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, None

    def line_of(self, index: int) -> int:
        """The first line of global row `index`: a fresh permutation of the lines each pass."""
        n = len(self.lines)
        epoch = index // n
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self._order[index % n])

    def _words_needed(self) -> int:
        """Whitespace words of a line that can reach a row: each gives at least one WordPiece and one
        word, so the first max(min_words, seq_len) of them fill the row as the whole line would."""
        return max(self.min_words, self.seq_len)

    def _encode(self, line: int) -> tuple[list[int], list[int]]:
        text, needed = self.lines[line], self._words_needed()
        if len(text) > 16 * needed:  # a long line (a dump without newlines): tokenize only what can be kept
            text = " ".join(text.split(maxsplit=needed)[:needed])
        enc = self.tokenizer.tokenizer(text, add_special_tokens=False)
        return list(enc["input_ids"]), [w if w is not None else 0 for w in enc.word_ids()]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (seq_len,), word index (seq_len,)), 0 / -1 padded, of global row `index`."""
        line, ids, words, count, empty_run = self.line_of(index), [], [], 0, 0
        while count < self.min_words:
            more, more_words = self._encode(line)
            if more:
                ids += more
                words += [count + w for w in more_words]
                count += more_words[-1] + 1
                empty_run = 0
            else:
                empty_run += 1
                if empty_run >= len(self.lines):
                    raise ValueError("--text-corpus: no line has a token the tokenizer knows")
            line = (line + 1) % len(self.lines)
        ids, words = ids[: self.seq_len], words[: self.seq_len]
        out_ids = np.zeros(self.seq_len, np.int64)
        out_words = np.full(self.seq_len, -1, np.int64)
        out_ids[: len(ids)], out_words[: len(words)] = ids, words
        return out_ids, out_words

    def rows(self, start: int, n: int) -> dict:
        """Rows start..start+n-1 of this process, masked: input_ids, attention_mask, lm_labels (n, seq_len)."""
        ids = np.zeros((n, self.seq_len), np.int64)
        words = np.full((n, self.seq_len), -1, np.int64)
        index = [(start + i) * self.world_size + self.rank for i in range(n)]
        for i, g in enumerate(index):
            ids[i], words[i] = self.sequence(g)
        masked = np.zeros_like(ids)
        labels = np.full_like(ids, IGNORE_INDEX)
        for i, g in enumerate(index):  # one generator per row: a pure function of (seed, row)
            rng = np.random.default_rng([self.seed, g, 1])
            masked[i: i + 1], labels[i: i + 1] = mask_corpus_text(
                ids[i: i + 1], words[i: i + 1], rng, self.tokenizer.mask_id, self.tokenizer.vocab_size)
        return {"input_ids": masked, "attention_mask": (words >= 0).astype(np.int64), "lm_labels": labels,
                "keys": [f"text:{g}" for g in index]}


def rows_before(micro_batch: int, batch_size: int, ratio: float) -> int:
    """Text rows taken by the first `micro_batch` caption batches of `batch_size` rows."""
    return int(np.floor(micro_batch * batch_size * ratio + 1e-9))


def _pad_columns(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


def append_text_rows(batch: dict, text: dict) -> dict:
    """A caption batch (the batch contract) with text-only rows appended: the text is padded to the
    longer of the two, text rows get no visual elements and no masked regions, text_only (B,) marks
    them. region_targets (compact, row-major) are unchanged: the new rows hold no masked region."""
    B, n = batch["input_ids"].shape[0], text["input_ids"].shape[0]
    T = max(batch["input_ids"].shape[1], text["input_ids"].shape[1])
    out = dict(batch)
    for name, pad in (("input_ids", 0), ("attention_mask", 0), ("lm_labels", IGNORE_INDEX), ("token_type_ids", 0)):
        cap = _pad_columns(batch[name], T, pad)
        extra = torch.from_numpy(text[name]) if name in text else torch.zeros(n, text["input_ids"].shape[1],
                                                                              dtype=cap.dtype)
        out[name] = torch.cat([cap, _pad_columns(extra.to(cap.dtype), T, pad)])
    for name in ("image_feat", "image_loc", "image_mask", "region_labels", "masked_regions"):
        if name in batch:
            x = batch[name]
            out[name] = torch.cat([x, x.new_zeros((n, *x.shape[1:]))])
    out["align_labels"] = torch.cat([batch["align_labels"], batch["align_labels"].new_zeros(n)])
    text_only = torch.zeros(B + n, dtype=torch.bool)
    text_only[B:] = True
    out["text_only"] = text_only
    out["keys"] = list(batch.get("keys", [])) + list(text["keys"])
    return out


@dataclass
class TextMixer:
    """Caption batches -> the same batches with their share of text-only rows: caption batch j of
    B rows gets the rows [rows_before(j), rows_before(j + 1)) (ratio rows per caption row, spread
    evenly). `start` = the caption batches a resumed run has already trained on."""

    stream: TextStream
    ratio: float = TEXT_RATIO
    start: int = 0

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        j = self.start
        for batch in batches:
            B = batch["input_ids"].shape[0]
            first, last = rows_before(j, B, self.ratio), rows_before(j + 1, B, self.ratio)
            j += 1
            yield append_text_rows(batch, self.stream.rows(first, last - first)) if last > first else batch
