"""Numerical parity with the official ViLBERT code, on shared random weights.

    python benchmarks/official_parity.py --official-repo PATH/TO/vilbert-multi-task

PATH must hold the official `vilbert/vilbert.py` (a local checkout; nothing is downloaded and no
official code is part of this project). Its `VILBertForVLTasks` is built from a small config with
random weights (perturbed so LayerNorms and biases are not trivial), converted with
`vilbert.official.convert_official_state_dict`, and every output of both models is compared, with
and without the multi-task task token. Prints a table of max |difference| and writes JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from vilbert import ViLBertConfig
from vilbert.official import convert_official_state_dict

RESULTS = Path(__file__).parent / "results"
SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, type_vocab_size=2, v_feature_size=24, v_target_size=11, v_hidden_size=48,
             v_num_hidden_layers=3, v_num_attention_heads=4, v_intermediate_size=40, bi_hidden_size=40,
             bi_num_attention_heads=4, v_biattention_id=[1, 2], t_biattention_id=[2, 3])

# The official vilbert.py imports `.utils.PreTrainedModel` (Hugging Face plumbing); this stand-in
# provides the two things the model classes use.
UTILS_SHIM = '''import torch.nn as nn
class PreTrainedModel(nn.Module):
    def __init__(self, config, *args, **kwargs):
        super().__init__()
        self.config = config
    def _tie_or_clone_weights(self, output, inputs):
        output.weight = inputs.weight
'''


def import_official(repo: Path):
    source = repo / "vilbert" / "vilbert.py"
    if not source.is_file():
        raise SystemExit(f"{source}: not found (pass the root of a vilbert-multi-task checkout)")
    pkg = Path(tempfile.mkdtemp()) / "official_vilbert"
    pkg.mkdir()
    shutil.copy(source, pkg / "vilbert.py")
    (pkg / "utils.py").write_text(UTILS_SHIM)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("official_vilbert.vilbert")


def compare(official_module, task_tokens: bool, seed: int = 0) -> dict:
    off_cfg = official_module.BertConfig(SMALL["vocab_size"], **{k: v for k, v in SMALL.items() if k != "vocab_size"},
                                         task_specific_tokens=task_tokens)
    off_cfg.fusion_method, off_cfg.visual_target = "mul", 0
    torch.manual_seed(seed)
    official = official_module.VILBertForVLTasks(off_cfg, num_labels=7).eval()
    with torch.no_grad():
        for p in official.state_dict().values():
            p.add_(0.05 * torch.randn_like(p))
    ours, _ = convert_official_state_dict(dict(official.state_dict()),
                                          ViLBertConfig.from_official_dict({**SMALL, "pooling_method": "mul"}))
    ours.eval()
    B, T, R = 4, 9, 7
    ids = torch.randint(1, SMALL["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 6:] = 0
    feat, loc = torch.randn(B, R, SMALL["v_feature_size"]), torch.rand(B, R, 5)
    image_mask = torch.ones(B, R, dtype=torch.long)
    image_mask[1, 4:] = 0
    tt = torch.zeros_like(ids)
    task_ids = torch.full((B, 1), 3) if task_tokens else None
    with torch.no_grad():
        vqa, gqa, retrieval, pair, entail, region_pred, refer, mlm, token, _ = official(
            ids, feat, loc, tt, mask, image_mask, None, task_ids)
        align = official.cls(*official.bert(ids, feat, loc, tt, mask, image_mask, None, task_ids)[:4])[2]
        out = ours.backbone(ids, feat, loc, tt, mask, image_mask, task_ids)
        pre = ours(ids, feat, loc, tt, mask, image_mask, task_ids=task_ids)
    real = image_mask.bool()
    pairs = {
        "mlm_logits": (mlm, pre.mlm_logits), "region_logits": (region_pred[real], pre.region_logits[real]),
        "alignment_logits": (align, pre.align_logits), "vqa": (vqa, ours.task_logits("vqa", out)),
        "gqa": (gqa, ours.task_logits("gqa", out)), "retrieval": (retrieval, ours.task_logits("retrieval", out)),
        "nlvr2": (pair, ours.task_logits("nlvr2", out)), "entailment": (entail, ours.task_logits("entailment", out)),
        "refer": (refer[real], ours.task_logits("refer", out, image_mask)[real]),
        "token": (token, ours.task_logits("token", out)),
    }
    return {name: float((a - b).detach().abs().max()) for name, (a, b) in pairs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-repo", type=Path, required=True)
    p.add_argument("--out", type=Path, default=RESULTS / "official_parity.json")
    a = p.parse_args(argv)
    module = import_official(a.official_repo)
    rows = {f"task_tokens={t}": compare(module, t) for t in (False, True)}
    names = list(next(iter(rows.values())))
    print("output | " + " | ".join(rows))
    for n in names:
        print(f"{n} | " + " | ".join(f"{r[n]:.2e}" for r in rows.values()))
    worst = max(v for r in rows.values() for v in r.values())
    print(f"max |difference| over all outputs: {worst:.2e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "command": "python benchmarks/official_parity.py --official-repo PATH",
                                 "max_abs_difference": worst, "results": rows}, indent=2) + "\n")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
