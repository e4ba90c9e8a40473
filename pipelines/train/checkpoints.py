"""Atomic training checkpoints: `OUT/checkpoints/step-00001000/`.

Each holds the model (`model.safetensors` + `config.json`, loadable with
`vilbert.load_pretrained`) and `trainer_state.pt` (optimizer, scheduler, grad scaler, step counters
and RNG states; tensors and plain containers only, read back with `weights_only=True`). A
checkpoint is written into a hidden temporary directory and renamed into place, so a directory
with a final name is always complete; a crash mid-save leaves the previous one untouched.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from common.safe_load import refusal
from vilbert import ViLBert, load_pretrained, save_pretrained

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_NAME = "trainer_state.pt"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in
                  zip(("kind", "keys", "pos", "has_gauss", "cached"), np.random.get_state())},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_files(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_model_dir(model: ViLBert, folder: Path, metadata: dict) -> Path:
    """`save_pretrained` into `folder` atomically: written beside it, then renamed over the old one
    (a kill leaves the old folder or the new one, or the old one as .NAME.old-PID beside it)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, metadata=metadata)
    _fsync_files(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_model_dir(folder: Path) -> bool:
    """After a kill between save_model_dir's two renames: the old folder back in place."""
    folder = Path(folder)
    if folder.exists():
        return False
    old = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if old:
        os.replace(old[-1], folder)
    return bool(old)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def save_checkpoint(root: Path, step: int, model: ViLBert, trainer_state: dict, metadata: dict, keep_last: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, metadata=metadata)
    torch.save(trainer_state, tmp / STATE_NAME)
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # leftovers of killed saves
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_resumable(ckpt: Path, required: tuple[str, ...], map_location="cpu"):
    """(ckpt, model, state), or the reason it cannot be resumed from (truncated weights, a state
    file cut by a full disk, a state without one of `required`) as one line."""
    try:
        model, state = load_checkpoint(ckpt, map_location=map_location)
    except Exception as error:  # safetensors, torch and JSON errors alike: the file is unusable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{ckpt}: not a usable checkpoint ({type(error).__name__}: {reason})"
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        reason = f"{ckpt}: not a usable checkpoint ({STATE_NAME} lacks {', '.join(missing)})"
        return ForeignReason(reason) if isinstance(state, dict) else reason
    return ckpt, model, state


class ForeignReason(str):
    """read_resumable's reason for a whole checkpoint that another command wrote."""


class ForeignCheckpoint(ValueError):
    """A sound checkpoint of another command (vilbert-train, vilbert-eval, vilbert-multitask): not ours
    to set aside."""


def newest_resumable(root: Path, required: tuple[str, ...], map_location="cpu", log=None):
    """The newest complete checkpoint under root that can be resumed from, as read_resumable's
    (ckpt, model, state), or None. A damaged one is logged and set aside as NAME.damaged; a whole one
    of another command (its state lacks `required`) is ForeignCheckpoint, and left where it is."""
    for ckpt in reversed(list_checkpoints(root)):  # newest first
        found = read_resumable(ckpt, required, map_location)
        if not isinstance(found, str):
            return found
        if isinstance(found, ForeignReason):  # whole, but another command's: leave it be
            raise ForeignCheckpoint(f"{ckpt}: a checkpoint of another command's run ({found.split('(', 1)[1][:-1]}; "
                                    "vilbert-train, vilbert-eval and vilbert-multitask each keep their own); it is "
                                    "left as it is: give another output folder")
        if log is not None:
            log.warning("%s; set aside as %s.damaged, resuming from the checkpoint before it", found, ckpt.name)
        try:
            os.replace(ckpt, ckpt.with_name(ckpt.name + ".damaged"))
        except OSError:
            pass  # another rank set it aside first
    return None


def load_checkpoint(path: Path, map_location="cpu") -> tuple[ViLBert, dict]:
    model = load_pretrained(path, map_location=map_location)
    try:
        state = torch.load(path / STATE_NAME, map_location=map_location, weights_only=True)
    except Exception as error:  # refuse, don't execute
        raise ValueError(refusal(path / STATE_NAME, error)) from None
    return model, state


# what a resumed pretraining run must share with the run it continues (the schedule, the batch, the
# data mix); --max-steps / --epochs may grow, and the device, precision, logging and saving may change
RESUMED_SETTINGS = ("batch_size", "micro_batch_size", "lr", "bert_lr_scale", "weight_decay", "warmup", "clip_grad",
                    "samples_per_epoch", "text_ratio", "text_seq_len")


def differences(then: dict, now: dict) -> list[str]:
    """"KEY: THEN then, NOW now" for each setting a checkpoint recorded (`then`) that this run (`now`)
    has otherwise; a setting it did not record (an earlier version's) is not compared."""
    return [f"{k}: {then[k]!r} then, {now.get(k)!r} now" for k in sorted(then) if then[k] != now.get(k)]


def check_resumed_settings(ckpt: Path, metadata: dict, now: dict) -> None:
    """ValueError naming what differs when this run's RESUMED_SETTINGS (`now`: its TrainConfig as JSON),
    or whether it has a text corpus, are not the checkpoint's `train_config`; settings an earlier
    version did not record are not compared."""
    saved = dict(metadata.get("train_config") or {})
    then = {k: saved[k] for k in RESUMED_SETTINGS if k in saved}
    if "text_corpus" in saved:  # the corpus may have moved; whether there is one may not change
        then["text corpus"] = saved["text_corpus"] is not None
    differ = differences(then, {**now, "text corpus": now.get("text_corpus") is not None})
    if differ:
        raise ValueError(f"{ckpt}: trained with other settings than this run's (" + "; ".join(differ)
                         + "); re-run with the same options to resume, or give another --out")


def refuse_later_checkpoints(root: Path, path: Path, step: int) -> None:
    """ValueError for a resume from `path` (at `step`) while `root` holds later checkpoints: the next
    --resume auto would take up that old history again (and --keep-last would prune the new one)."""
    later = [c.name for c in list_checkpoints(root) if c.resolve() != path.resolve() and
             int(c.name.rsplit("-", 1)[1]) > step]
    if later:
        raise ValueError(f"--resume {path}: {root} holds later checkpoints ({', '.join(later[:4])}) of the history "
                         "it would branch from; move them away, or resume into another --out")
