"""Tokenisation for the tasks: a BERT WordPiece tokenizer from a local directory or vocab.txt."""
from __future__ import annotations

from pathlib import Path

import torch

from pipelines.data.tokenization import check_tokenizer_files, checked_size, vocabulary_words


def load_tokenizer(path: str | Path, lower_case: bool = True):
    """`path`: a Hugging Face tokenizer directory (e.g. bert-base-uncased) or a vocab.txt file."""
    from transformers import BertTokenizerFast

    path = Path(path)
    check_tokenizer_files(path)  # a FIFO is one line, never "no vocab.txt"
    folder = path.parent if path.is_file() and path.name == "vocab.txt" else path
    if path.is_file() and path.name != "vocab.txt":
        raise ValueError(f"{path}: a vocabulary file must be named vocab.txt (or pass its directory)")
    if not folder.is_dir() or not any((folder / n).is_file() for n in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no vocab.txt or tokenizer.json "
                                "(pass a BERT tokenizer directory or vocab.txt)")
    if (folder / "vocab.txt").is_file():
        vocabulary_words(folder / "vocab.txt")  # a file of another kind is one line, not a tokenizer error
    # transformers 5 ignores `vocab_file=` in the constructor; from_pretrained reads the folder
    tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True, do_lower_case=lower_case)
    return checked_size(tok, folder)


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """[CLS] text [SEP], truncated to max_length, padded to the longest -> input_ids, attention_mask,
    token_type_ids, each (B, T)."""
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="longest", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": torch.zeros_like(enc["input_ids"])}


def encode_with_mask_slot(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """VL-BERT's VQA input `<question, [MASK], image>`: [CLS] text [SEP] [MASK] [SEP], the text cut so
    that the row fits max_length, padded to the longest -> input_ids, attention_mask, token_type_ids
    (0 up to the first [SEP], 1 for [MASK] [SEP], as the official prepare_text_from_qa), each (B, T),
    and mask_position (B,), the index of each row's [MASK]."""
    if max_length < 5:
        raise ValueError(f"a question with a [MASK] slot needs --max-seq-length >= 5, got {max_length}")
    enc = tokenizer(list(texts), max_length=max_length - 2, truncation=True)
    rows = [ids + [tokenizer.mask_token_id, tokenizer.sep_token_id] for ids in enc["input_ids"]]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    token_type_ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        token_type_ids[i, len(ids) - 2:len(ids)] = 1
    mask_position = attention_mask.sum(1) - 2  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "mask_position": mask_position}
