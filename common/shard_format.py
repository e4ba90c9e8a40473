"""The names of the shard format (docs/shard-format.md), the contract between `vilbert-extract`
(which writes it) and training and evaluation (which read it)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict

import numpy as np

SIZES_FILE = "sizes.json"  # shard file name -> sample count, beside the shards
RECIPE_FILE = "recipe.json"  # the feature recipe every sample of the folder was made with
ERRORS_FILE = "errors.jsonl"  # one line per input the extractor rejected

PRETRAINING_MEMBERS = ("json", "features.npy", "boxes.npy", "cls_prob.npy")  # a sample pretraining reads
FINETUNING_MEMBERS = ("json", "features.npy", "boxes.npy")  # a sample the downstream tasks read
# the sample-JSON fields that make up the feature recipe (two samples of different recipes never mix)
RECIPE_FIELDS = ("detector", "weights_hash", "seed", "recipe", "precision", "mode", "min_boxes", "max_boxes",
                 "conf_threshold", "proposals")


def npy_bytes(array: np.ndarray) -> bytes:
    """A `.npy` member: the array in NumPy's format, never pickled."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_sizes(path) -> Dict[str, int]:
    """A folder's sizes.json: {shard file name: sample count}; ValueError naming the file and the
    entry unless it is a readable JSON object of whole numbers >= 0."""
    try:
        sizes = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(sizes, dict):
        raise ValueError(f"{path}: a JSON {type(sizes).__name__}, expected an object {{shard file name: sample count}}")
    for name, count in sizes.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{path}: {name!r} has the sample count {count!r}, expected a whole number >= 0")
    return sizes
