"""The --device option of every CLI: 'auto' picks CUDA when there is one; anything else is checked
before any work starts, so a typo or a missing GPU is one readable error."""
from __future__ import annotations

import torch


def check_device(name: str) -> str:
    """'auto' -> 'cuda' or 'cpu'; a valid torch device string whose device exists -> itself;
    else ValueError saying why."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}")
    return name
