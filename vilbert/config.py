"""Model configuration: one dataclass, named presets stored as JSON files.

Field names follow the official ViLBERT `BertConfig` (vilbert-multi-task) so that its JSON
files (e.g. `bert_base_6layer_6conect.json`) load with `ViLBertConfig.from_official_json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

ARCHS = ("vilbert", "vlbert")
FUSIONS = ("mul", "sum")

# Sizes and counts a model cannot be built with below 1 (a width, a table, a head count, a stack).
POSITIVE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "v_feature_size", "v_target_size", "v_hidden_size",
    "v_num_hidden_layers", "v_num_attention_heads", "v_intermediate_size", "bi_hidden_size",
    "bi_num_attention_heads", "bi_intermediate_size", "v_geometry_dim",
)
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "v_hidden_dropout_prob",
                  "v_attention_probs_dropout_prob")


@dataclass
class ViLBertConfig:
    arch: str = "vilbert"  # "vilbert" (two streams + co-attention) or "vlbert" (single stream)

    # text stream (BERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    # visual stream
    v_feature_size: int = 2048  # detector region feature width
    v_target_size: int = 1601  # detector classes incl. background (column 0)
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1

    # co-attention
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    # Kept for fidelity with the official JSON; the official connection layer's FFNs use
    # `intermediate_size` (text side) and `v_intermediate_size` (visual side), and so do we.
    bi_intermediate_size: int = 1024
    # Co-attention layer k runs after visual layer v_biattention_id[k]-1 and text layer
    # t_biattention_id[k]-1 (the official BertEncoder schedule).
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    with_coattention: bool = True  # False: the co-attention layers are skipped (ablation)

    # VL-BERT only: initial gains of the LayerNorms on the visual feature embedding of words and of
    # visual elements (VL-BERT's visual_ln_text / visual_ln_object). 0 for both, as in every official
    # VL-BERT config: the model starts as plain BERT and learns how much of the image to take in.
    # (VL-BERT's token types: `type_vocab_size` text segments, then one visual segment after them.)
    visual_scale_text_init: float = 0.0
    visual_scale_object_init: float = 0.0
    # VL-BERT only: sin and cos features per box coordinate in the geometry embedding (official: 256,
    # i.e. 4 x 2 x 256 = 2048 geometry features beside the 2048-d appearance feature).
    v_geometry_dim: int = 256

    fusion_method: str = "mul"  # how h_IMG and h_CLS are combined for alignment
    task_specific_tokens: bool = False  # vilbert-multi-task: a task token after [CLS]
    num_task_tokens: int = 20
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self):
        self._check_numbers()
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.fusion_method not in FUSIONS:
            raise ValueError(f"fusion_method must be one of {FUSIONS}, got {self.fusion_method!r}")
        for name, width, heads in [
            ("text", self.hidden_size, self.num_attention_heads),
            ("visual", self.v_hidden_size, self.v_num_attention_heads),
            ("co-attention", self.bi_hidden_size, self.bi_num_attention_heads),
        ]:
            if width % heads:
                raise ValueError(f"{name} width {width} is not divisible by {heads} heads")
        if self.arch == "vilbert":
            self._check_schedule()
        elif self.bi_hidden_size != self.hidden_size:
            raise ValueError(f"VL-BERT has one width: bi_hidden_size ({self.bi_hidden_size}) must equal "
                             f"hidden_size ({self.hidden_size})")
        elif self.task_specific_tokens:
            raise ValueError("VL-BERT has no task-specific tokens (task_specific_tokens is for arch vilbert)")

    def _check_numbers(self):
        """ValueError naming the field, its value and the rule for a number no model can be built or
        trained with: a size or count below 1, a negative number of task tokens (at least 1 with
        task_specific_tokens), a dropout outside [0, 1], a LayerNorm eps <= 0, a negative
        initializer_range, or a float that is NaN or infinite."""
        rules = [(name, "a whole number >= 1", lambda v: v >= 1) for name in POSITIVE_FIELDS]
        rules += [(name, "a probability in [0, 1]", lambda v: 0 <= v <= 1) for name in DROPOUT_FIELDS]
        rules += [("layer_norm_eps", "a number > 0", lambda v: v > 0),
                  ("initializer_range", "a number >= 0 (the std of the initial weights)", lambda v: v >= 0)]
        if self.task_specific_tokens:
            rules.append(("num_task_tokens", "a whole number >= 1 with task_specific_tokens", lambda v: v >= 1))
        else:
            rules.append(("num_task_tokens", "a whole number >= 0", lambda v: v >= 0))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and _is_number(value) and not math.isfinite(value):
                raise ValueError(f"config field {f.name}={value!r}: must be a finite number")
        for name, rule, holds in rules:
            value = getattr(self, name)
            if _is_number(value) and not holds(value):
                raise ValueError(f"config field {name}={value!r}: must be {rule}")

    def _check_schedule(self):
        v_ids, t_ids = list(self.v_biattention_id), list(self.t_biattention_id)
        if len(v_ids) != len(t_ids):
            raise ValueError("v_biattention_id and t_biattention_id must have the same length")
        for ids, n, name in [(v_ids, self.v_num_hidden_layers, "v"), (t_ids, self.num_hidden_layers, "t")]:
            if ids != sorted(ids) or any(i < 0 or i > n for i in ids):
                raise ValueError(f"{name}_biattention_id {ids} must be increasing within [0, {n}]")

    @property
    def num_coattention_layers(self) -> int:
        return len(self.v_biattention_id) if self.arch == "vilbert" else 0

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViLBertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], f.type):
                raise ValueError(f"config field {f.name}={d[f.name]!r}: expected {f.type}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "ViLBertConfig":
        """A config JSON, or the config.json of a checkpoint written by save_pretrained."""
        try:
            d = json.loads(Path(path).read_text())
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields")
        if isinstance(d.get("config"), dict) and "task_heads" in d:
            d = d["config"]
        return cls.from_dict(d)

    @classmethod
    def from_official_json(cls, path: str | Path) -> "ViLBertConfig":
        """Read an official vilbert-multi-task / vilbert_beta config JSON."""
        return cls.from_official_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_official_dict(cls, d: dict) -> "ViLBertConfig":
        for key, expected in [("hidden_act", "gelu"), ("v_hidden_act", "gelu")]:
            if d.get(key, expected) != expected:
                raise ValueError(f"official config {key}={d[key]!r} is not supported (only gelu)")
        if d.get("bi_attention_type", 1) != 1:
            raise ValueError("only bi_attention_type 1 (the released models) is supported")
        if d.get("dynamic_attention", False):
            raise ValueError("dynamic_attention models are not supported")
        d = dict(d)
        if "pooling_method" in d:  # the released JSON calls fusion "pooling_method"
            d.setdefault("fusion_method", d.pop("pooling_method"))
        ignored = {
            "hidden_act", "v_hidden_act", "bi_attention_type", "dynamic_attention", "v_initializer_range",
            "fast_mode", "in_batch_pairs", "fixed_t_layer", "fixed_v_layer", "objective",
            "visualization", "model", "visual_target", "num_negative", "predict_feature",
            "num_locs", "bi_hidden_dropout_prob",
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            raise ValueError(f"unknown official config fields: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})


def preset_names() -> list[str]:
    files = resources.files("vilbert") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def _is_number(value) -> bool:
    """Whether a value is an int or float (not a bool): the fields the range checks apply to."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated `annotation` (int, float, bool, str, list[int])."""
    if annotation == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation == "int":
        return isinstance(value, int)
    if annotation == "float":
        return isinstance(value, (int, float))
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[int]":
        return isinstance(value, (list, tuple)) and all(_has_type(v, "int") for v in value)
    return True


def load_preset(name: str, **overrides) -> ViLBertConfig:
    """Load a named preset (`vilbert-base`, `vilbert-tiny`, `vlbert-base`, `vlbert-tiny`)."""
    path = resources.files("vilbert") / "presets" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    d = json.loads(path.read_text())
    d.update(overrides)
    return ViLBertConfig.from_dict(d)
