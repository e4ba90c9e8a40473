"""Loading and saving weights.

* the project's own format: a directory with `model.safetensors` + `config.json`;
* a Hugging Face BERT directory (config.json + weights, any format transformers reads), to
  initialise the text stream and the masked-language head.
Official ViLBERT checkpoints are converted by `vilbert.official`, VL-BERT's by `vilbert.official_vlbert`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.safe_load import regular_file

from .config import ViLBertConfig
from .pretraining import ViLBert

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class LoadReport:
    """What happened when foreign weights were loaded into a model."""

    loaded: list[str] = field(default_factory=list)  # our parameter names that received weights
    missing: list[str] = field(default_factory=list)  # our parameters left at their initial value
    unused: list[str] = field(default_factory=list)  # source keys deliberately not used

    def summary(self) -> str:
        return f"loaded {len(self.loaded)} tensors, {len(self.missing)} missing, {len(self.unused)} unused"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pretrained(model: ViLBert, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (config + task heads + free-form metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(directory / WEIGHTS_NAME, 0o666 & ~_umask())  # safetensors writes 0600; as any other file here
    doc = {
        "config": model.config.to_dict(),
        "task_heads": {k: list(v) for k, v in model.task_heads.spec.items()},
        "metadata": metadata or {},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return directory


def nonfinite_tensors(state: dict) -> list[tuple[str, int, int]]:
    """(name, non-finite values, values) of each floating tensor of `state` holding NaN or infinity."""
    bad = []
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad.append((name, int((~finite).sum()), tensor.numel()))
    return bad


def check_finite(state: dict, source) -> None:
    """ValueError naming `source`, the tensors and the counts if a weight is NaN or infinite: such a
    model scores every input NaN, and an argmax over NaN still looks like an answer."""
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(f"{name} ({n} of {total})" for name, n, total in bad[:5])
        more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
        n = sum(n for _, n, _ in bad)
        raise ValueError(f"{source}: {n} weight{'s' * (n != 1)} not finite (NaN or infinite) in {len(bad)} "
                         f"tensor{'s' * (len(bad) != 1)}: {shown}{more}; the checkpoint is damaged (a diverged "
                         "or corrupted run) and was not loaded")


def read_checkpoint_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    try:
        regular_file(path, "checkpoint config")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (expected a directory written by save_pretrained)") from None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    for name in ("config", "task_heads"):
        if not isinstance(doc, dict) or not isinstance(doc.get(name), dict):
            raise ValueError(f"{path}: no {name!r} object (not a checkpoint written by save_pretrained)")
    return doc


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> ViLBert:
    """Inverse of `save_pretrained`; strict (every tensor must match)."""
    doc = read_checkpoint_config(directory)
    model = ViLBert(ViLBertConfig.from_dict(doc["config"]), {k: tuple(v) for k, v in doc["task_heads"].items()})
    path = regular_file(Path(directory) / WEIGHTS_NAME, "checkpoint weights")
    try:
        state = load_file(str(path), device=str(map_location))
    except Exception as error:  # safetensors' own error type: truncated, not safetensors, unreadable
        raise ValueError(f"{path}: not a readable safetensors file ({str(error).strip() or type(error).__name__})"
                         ) from None
    check_finite(state, path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensor shapes of another config
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ValueError(f"{directory}: the weights do not fit its config.json ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{directory}: checkpoint does not match its config: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.checkpoint_metadata = doc.get("metadata", {})
    return model


# ---- Hugging Face BERT -> text stream --------------------------------------------------------

def text_layer_prefix(config: ViLBertConfig) -> str:
    return "backbone.encoder.text_layers" if config.arch == "vilbert" else "backbone.layers"


# BERT layer internals; shared with the official converter (whose text layers use BERT names).
BERT_LAYER_RULES = [
    (r"attention\.self\.(query|key|value)\.(weight|bias)", r"attention.\1.\2"),
    (r"attention\.output\.dense\.(weight|bias)", r"attention_output.dense.\1"),
    (r"attention\.output\.LayerNorm\.(weight|bias)", r"attention_output.norm.\1"),
    (r"intermediate\.dense\.(weight|bias)", r"ffn.intermediate.\1"),
    (r"output\.dense\.(weight|bias)", r"ffn.output.dense.\1"),
    (r"output\.LayerNorm\.(weight|bias)", r"ffn.output.norm.\1"),
]

BERT_EMBEDDING_RULES = [
    (r"(word|position|token_type)_embeddings\.weight", r"\1_embeddings.weight"),
    (r"LayerNorm\.(weight|bias)", r"norm.\1"),
]

MLM_HEAD_RULES = [
    (r"predictions\.transform\.dense\.(weight|bias)", r"mlm_head.transform.dense.\1"),
    (r"predictions\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.transform.norm.\1"),
    (r"predictions\.bias", r"mlm_head.bias"),
]


def apply_rules(name: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def map_bert_key(key: str, config: ViLBertConfig) -> str | None:
    """A key of transformers' BertForPreTraining / BertModel -> our name, or None if unused."""
    key = key.removeprefix("bert.")
    if key.startswith("embeddings."):
        sub = apply_rules(key[len("embeddings."):], BERT_EMBEDDING_RULES)
        return f"backbone.embeddings.{sub}" if sub else None
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
    if m:
        sub = apply_rules(m.group(2), BERT_LAYER_RULES)
        return f"{text_layer_prefix(config)}.{m.group(1)}.{sub}" if sub else None
    if key.startswith("cls."):
        return apply_rules(key[len("cls."):], MLM_HEAD_RULES)
    if config.arch == "vlbert" and re.fullmatch(r"pooler\.dense\.(weight|bias)", key):
        return f"backbone.{key}"  # VL-BERT's pooler is BERT's (the official code loads it too)
    return None


def load_bert_weights(model: ViLBert, bert_dir: str | Path) -> LoadReport:
    """Initialise the text stream (embeddings, text layers) and the MLM head from a local BERT (and,
    for VL-BERT, its pooler; BERT's two token types fill VL-BERT's text segments).

    Uses `transformers` to read the directory (safetensors or .bin, with its safe loader).
    Returns a report of what landed; raises if a BERT tensor has the wrong shape or if BERT has
    more layers than the text stream."""
    from transformers import BertForPreTraining

    bert_dir = Path(bert_dir)
    for entry in sorted(bert_dir.iterdir()) if bert_dir.is_dir() else ():  # transformers would wait on a FIFO
        if not entry.is_dir():
            regular_file(entry, "a file of the BERT directory")
    if not (bert_dir / "config.json").is_file():
        raise FileNotFoundError(f"{bert_dir}: not a BERT directory (no config.json)")
    bert = BertForPreTraining.from_pretrained(str(bert_dir), local_files_only=True)
    source = bert.state_dict()
    check_finite({k: v for k, v in source.items() if map_bert_key(k, model.config)}, bert_dir)
    ours = model.state_dict()
    report = LoadReport()
    with torch.no_grad():
        for key, tensor in source.items():
            name = map_bert_key(key, model.config)
            if name is None or name == "mlm_head.word_embeddings.weight":
                report.unused.append(key)
                continue
            if name not in ours:
                raise ValueError(f"{bert_dir}: BERT tensor {key} maps to {name}, which this model lacks")
            target = ours[name]
            if name == "backbone.embeddings.token_type_embeddings.weight" and model.config.arch == "vlbert":
                target = target[: model.config.type_vocab_size]  # the text segments; the visual row stays new
            if target.shape != tensor.shape:
                raise ValueError(f"{bert_dir}: {key} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(ours[name].shape)}")
            target.copy_(tensor)
            report.loaded.append(name)
    loaded = set(report.loaded)
    report.missing = sorted(k for k in ours if k not in loaded)
    return report
