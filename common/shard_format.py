"""The names of the shard format (docs/shard-format.md), the contract between `vilbert-extract`
(which writes it) and training and evaluation (which read it)."""
from __future__ import annotations

import io

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
