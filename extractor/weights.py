"""Loading detector weights safely and strictly.

* `.pkl` — detectron2 pickle (`{"model": {name: ndarray}}`, as py-bottom-up-attention's
  `faster_rcnn_from_caffe[_attr].pkl`), read with a restricted unpickler that admits only
  containers, numbers, strings and numpy arrays; anything else is refused without being executed.
  Norms stored without running statistics load as detectron2 loads them (mean 0, var 1).
* `.bin` / `.pth` / `.pt` — torch state dict (e.g. `unc-nlp/frcnn-vg-finetuned/pytorch_model.bin`)
  read with `torch.load(weights_only=True)` and mapped to our names (HF stores BatchNorm counters
  and the anchor generator's cell anchors, which we recompute and check).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import torch

from common.safe_load import RestrictedUnpickler, refusal


class WeightsError(ValueError):
    """A weight file that cannot be used, with the file and the reason in the message."""


class _RestrictedUnpickler(RestrictedUnpickler):
    """common.safe_load's unpickler (containers, numbers, strings, numpy arrays), refusing with WeightsError."""

    def refuse(self, module: str, name: str):
        raise WeightsError(f"{self.source}: refusing to unpickle global {module}.{name}; only dicts, "
                           "lists, numbers, strings and numpy arrays are allowed in a weight pickle")


def read_detectron2_pickle(path: str) -> Dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            data = _RestrictedUnpickler(io.BytesIO(handle.read()), path).load()
    except WeightsError:
        raise
    except Exception as error:  # corrupt / not a pickle
        raise WeightsError(f"{path}: not a readable detectron2 pickle ({error})") from error
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    elif isinstance(data, dict) and isinstance(data.get("blobs"), dict):  # Caffe2 / Detectron1
        data = data["blobs"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of name -> array, got {type(data).__name__}")
    names = [n for n in data if isinstance(n, str)]
    if any(n.endswith("_momentum") or "_branch2a_" in n or n == "conv1_w" for n in names):
        raise WeightsError(f"{path}: uses Caffe2/Detectron1 blob names (e.g. res2_0_branch2a_w); "
                           "only detectron2 names are supported - load it once with detectron2's "
                           "DetectionCheckpointer and save model.state_dict()")
    return dict(data)


def read_torch_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # refuse, don't execute
        raise WeightsError(refusal(path, error)) from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(data).__name__}")
    return dict(data)


def read_weight_file(path: str) -> Dict[str, torch.Tensor]:
    """Read `.pkl`, `.bin`, `.pth`, `.pt` into name -> float tensor (names not yet mapped)."""
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if file.suffix == ".pkl":
        raw = read_detectron2_pickle(path)
    elif file.suffix in (".bin", ".pth", ".pt"):
        raw = read_torch_state_dict(path)
    else:
        raise WeightsError(f"{path}: unknown weight format {file.suffix!r} (use .pkl, .bin, .pth or .pt)")
    tensors = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise WeightsError(f"{path}: non-string parameter name {name!r}")
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise WeightsError(f"{path}: {name} has non-numeric dtype {value.dtype}")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            continue  # detectron2 pickles carry metadata such as "__author__"
        tensors[name] = value
    return tensors


def map_to_detector_names(tensors: Mapping[str, torch.Tensor], expected_anchors: torch.Tensor,
                          path: str) -> Dict[str, torch.Tensor]:
    """HF frcnn / older checkpoints -> our names: gamma/beta -> weight/bias, drop BatchNorm
    `num_batches_tracked`, check-and-drop `proposal_generator.anchor_generator.cell_anchors.*`."""
    mapped = {}
    for name, tensor in tensors.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith("proposal_generator.anchor_generator.cell_anchors"):
            if tensor.shape != expected_anchors.shape or not torch.allclose(
                    tensor.float(), expected_anchors, atol=1e-3):
                raise WeightsError(f"{path}: {name} differs from the configured anchors "
                                   f"(sizes/aspect ratios); file has shape {tuple(tensor.shape)}")
            continue
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        mapped[name] = tensor
    return mapped


def with_default_norm_statistics(tensors: Dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                                 ) -> Dict[str, torch.Tensor]:
    """A detectron2 pickle may hold a frozen BatchNorm as its affine part only (weight, bias: the
    Caffe/Detectron conversions folded the statistics in). detectron2's FrozenBatchNorm2d loads such
    a norm with running_mean 0 and running_var 1 (its _load_from_state_dict for checkpoints without
    a version); so does this, for norms whose weight the file has and whose statistics it lacks."""
    filled = dict(tensors)
    for name in own:
        for stat, value in (("running_mean", 0.0), ("running_var", 1.0)):
            if name.endswith("." + stat) and name not in filled and name[: -len(stat)] + "weight" in filled:
                filled[name] = torch.full_like(own[name], value)
    return filled


def file_sha256_prefix(path: str, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def load_detector_weights(model: torch.nn.Module, path: str) -> None:
    """Strictly load `path` into `model`; unknown, missing or mis-shaped names raise WeightsError."""
    tensors = read_weight_file(path)
    anchors = model.proposal_generator.base_anchors.detach().cpu()
    tensors = map_to_detector_names(tensors, anchors, path)
    own = model.state_dict()
    if Path(path).suffix == ".pkl":
        tensors = with_default_norm_statistics(tensors, own)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(own[n].shape)}"
                        for n in set(own) & set(tensors) if tensors[n].shape != own[n].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:20])}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:20])}")
    attribute_names = [n for n in unexpected if ".box_predictor." in n and "attr" in n or "cls_embedding" in n]
    if attribute_names and not model.config.use_attributes:
        problems.append("the file has the attribute head (as unc-nlp/frcnn-vg-finetuned's and the _attr .pkl): "
                        "pass --attributes")
    if any("attr" in n or "cls_embedding" in n for n in missing) and model.config.use_attributes:
        problems.append("the file has no attribute head: drop --attributes")
    if problems:
        raise WeightsError(f"{path}: does not match detector {model.config.name!r} "
                           f"(use_attributes={model.config.use_attributes}): " + " | ".join(problems))
    model.load_state_dict({n: t.to(own[n].dtype) for n, t in tensors.items()}, strict=True)
    model.weights_hash = file_sha256_prefix(path)
