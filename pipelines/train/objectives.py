"""Which pretraining objective a run uses: ViLBERT's (0, 1, 2: how alignment negatives count,
see pipelines/data/batching.OBJECTIVES) or VL-BERT's ("vlbert"), each for its own architecture;
the objective is stored in every checkpoint (config.json's train_config) and a resumed run must
use the same."""
from __future__ import annotations

OBJECTIVES = {"vilbert": (0, 1, 2), "vlbert": ("vlbert",)}
DEFAULT = {"vilbert": 1, "vlbert": "vlbert"}


def parse_objective(value) -> int | str | None:
    """'0' / '1' / '2' -> int, 'vlbert' -> 'vlbert', None -> None (the architecture's default)."""
    if value is None or value == "vlbert":
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"objective must be 0, 1, 2 or vlbert, got {value!r}") from None


def resolve_objective(arch: str, objective) -> int | str:
    """The objective for a model of `arch` (None: its default); ValueError, one line, on a misfit."""
    objective = parse_objective(objective)
    if objective is None:
        return DEFAULT[arch]
    if objective not in OBJECTIVES[arch]:
        fits = ", ".join(str(o) for o in OBJECTIVES[arch])
        raise ValueError(f"objective {objective} does not fit arch {arch!r} (it takes {fits}; "
                         f"{'vlbert is VL-BERT' if objective == 'vlbert' else '0-2 are ViLBERT'}'s)")
    return objective


def check_resumed_objective(ckpt, metadata: dict, objective) -> None:
    """Refuse to resume a checkpoint trained with another objective (checkpoints of before the
    objective was stored are taken as ViLBERT's default, 1)."""
    saved = (metadata.get("train_config") or {}).get("objective", 1)
    if saved != objective:
        raise ValueError(f"{ckpt}: the checkpoint was trained with objective {saved}, this run asks for "
                         f"{objective}; use the same --objective, or another --out")
