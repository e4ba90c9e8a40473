"""Caption tokenization: the BERT uncased WordPiece tokenizer (transformers' fast tokenizer) from a
local directory or a vocab.txt, [CLS] caption [SEP], truncated and zero-padded to a fixed length."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.safe_load import regular_file

# The loader forks DataLoader workers after the tokenizer may have run in the parent.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary_words(path: Path) -> list[str]:
    """The tokens of a BERT vocab.txt; ValueError naming the file if it is not UTF-8 text or lacks
    the special tokens (a file of another kind given as --tokenizer)."""
    try:
        words = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path}: not a vocabulary (a BERT vocab.txt is UTF-8 text, one token a line): "
                         f"{error}") from None
    missing = [t for t in SPECIAL_TOKENS if t not in words]
    if missing:
        raise ValueError(f"{path}: not a BERT vocabulary (no {', '.join(missing)})")
    return words


def _from_vocab_file(path: Path):
    """transformers 5 takes `vocab=` (a path or dict), 4.x `vocab_file=`; the other is ignored
    silently, so check that the whole vocabulary was loaded."""
    import inspect

    from transformers import BertTokenizerFast

    parameters = inspect.signature(BertTokenizerFast.__init__).parameters
    argument = "vocab" if "vocab" in parameters else "vocab_file"
    lines = len(vocabulary_words(path))
    tokenizer = BertTokenizerFast(**{argument: str(path)}, do_lower_case=True)
    if len(tokenizer) < lines:
        raise ValueError(f"{path}: loaded {len(tokenizer)} of its {lines} vocabulary entries")
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A BertTokenizerFast (lower-cased) from a directory holding a tokenizer.json or vocab.txt (a
    tokenizer_config.json alone is no vocabulary), or from a vocab.txt file itself; ValueError naming
    the file or folder for one that is not JSON, not a tokenizer, or of no more than the special tokens."""
    path = Path(path)
    check_tokenizer_files(path)
    if path.is_file():
        return checked_size(_from_vocab_file(path), path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory or vocab file")
    vocab, config = (path / "vocab.txt").is_file(), (path / "tokenizer_config.json").is_file()
    if (path / "tokenizer.json").is_file() or (vocab and config):
        if vocab:
            vocabulary_words(path / "vocab.txt")  # a file of another kind is one line, not a tokenizer error
        return checked_size(_from_folder(path), path)
    if vocab:
        return checked_size(_from_vocab_file(path / "vocab.txt"), path)
    raise FileNotFoundError(f"{path}: holds neither tokenizer.json nor vocab.txt"
                            + (" (a tokenizer_config.json alone is no vocabulary)" if config else ""))


def check_tokenizer_files(path: Path) -> None:
    """ValueError naming the file when `path`, or a tokenizer file in the folder `path`, is there but
    is no regular file (a FIFO would block the read forever; it was reported as missing)."""
    if path.exists() and not path.is_dir():
        regular_file(path, "a vocab.txt or a tokenizer directory")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if path.is_dir() and (path / name).exists():
            regular_file(path / name, f"the tokenizer's {name}")


def _from_folder(path: Path):
    """BertTokenizerFast.from_pretrained of a folder holding tokenizer.json (or vocab.txt with its
    tokenizer_config.json); ValueError naming the file that is not JSON, or the folder whose files
    transformers cannot make a tokenizer of."""
    import json

    from transformers import BertTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
                raise ValueError(f"{path / name}: not valid JSON ({error})") from None
    try:
        return BertTokenizerFast.from_pretrained(str(path), do_lower_case=True, local_files_only=True)
    except Exception as error:  # the tokenizers library raises plain Exceptions (KeyError for `{}`)
        raise ValueError(f"{path}: not a tokenizer ({type(error).__name__}: {error})") from None


def checked_size(tokenizer, path: Path):
    """The tokenizer, unless its vocabulary is no more than the 5 special tokens (every word would
    be [UNK]): ValueError naming `path`."""
    if len(tokenizer) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{path}: the tokenizer vocabulary has only {len(tokenizer)} entries "
                         "(every word would be [UNK])")
    return tokenizer


@dataclass
class CaptionTokenizer:
    """Batched tokenization into fixed-size arrays; holds the special ids masking needs."""

    tokenizer: object
    max_seq_len: int = 36

    def __post_init__(self):
        if self.max_seq_len < 3:
            raise ValueError(f"max_seq_len must be at least 3 ([CLS] token [SEP]), got {self.max_seq_len}")
        tok = self.tokenizer
        for name in ("cls_token_id", "sep_token_id", "mask_token_id"):
            if getattr(tok, name) is None:
                raise ValueError(f"the tokenizer's vocabulary has no {name.replace('_id', '')}")
        self.mask_id = tok.mask_token_id
        self.vocab_size = len(tok)

    def __call__(self, captions: list[str], words: bool = False):
        """-> (input_ids (B, T) int64 [CLS] ... [SEP] then 0s, lengths (B,) incl. [CLS]/[SEP]); with
        words, also the word index of each token (B, T) (-1 at [CLS], [SEP] and padding), for
        whole-word masking."""
        encoded = self.tokenizer(captions, add_special_tokens=True, truncation=True,
                                 max_length=self.max_seq_len, padding="max_length",
                                 return_attention_mask=True, return_token_type_ids=False)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)  # (B, T)
        real = np.asarray(encoded["attention_mask"], dtype=np.int64)  # (B, T)
        if not words:
            return ids * real, real.sum(axis=1)
        index = np.array([[-1 if w is None else w for w in encoded.word_ids(b)] for b in range(len(captions))],
                         dtype=np.int64).reshape(ids.shape)
        return ids * real, real.sum(axis=1), np.where(real.astype(bool), index, -1)
