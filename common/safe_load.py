"""Reading weight and state files without executing what they hold."""
from __future__ import annotations

import re


def refusal(path, error: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused: torch's reason (the Python global
    the file would import and call, or the pickle instruction it would need) and that nothing ran.
    Torch's own advice to retry with weights_only=False is not repeated: that would run the file."""
    text = str(error)
    if "Weights only load failed" in text:
        named = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", text)))
        reason = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", text)
        detail = f"it names {', '.join(named)}" if named else (reason.group(0) if reason else "see torch.load")
        return (f"{path}: refused: the file holds pickled data beyond tensors and plain containers ({detail}), "
                "which only a code-running unpickler reads; nothing from it was run")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{path}: not a readable weights-only PyTorch file ({first})"
