"""Parity of `pipelines.tasks.vqa_eval` with the official VQA evaluator and the released preprocessing.

    python benchmarks/vqa_eval_parity.py --official-repo PATH/TO/VQA [--softscore-repo PATH/TO/bottom-up-attention-vqa]

PATH/TO/VQA is a local checkout of GT-Vision-Lab/VQA (its Python 2 `vqaEval.py` is loaded at run
time, print statements turned into calls; nothing of it is part of this project). Its `VQAEval`
scores the same questions as `vqa_accuracy`: hand-made cases for every rule, then random questions
whose ten answers are drawn from a pool of spellings (punctuation, numbers, articles, contractions,
whitespace). With --softscore-repo (hengyuan-hu/bottom-up-attention-vqa), `preprocess_answer` and
`answer_score` are compared with its `tools/compute_softscore.py`. Prints a table and writes JSON
to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import types
from pathlib import Path

from pipelines.tasks.vqa_eval import answer_score, preprocess_answer, vqa_accuracy

sys.path.insert(0, str(Path(__file__).parent))
from report import print_table, write_json

RESULTS = Path(__file__).parent / "results"
POOL = ["yes", "Yes", "yes.", "no", "No!", "2", "two", "Two", "none", "0", "1,000", "1000", "1.5", ".5", "5",
        "$5", "5%", "2:30", "230", "the dog", "a dog", "dog", "Dog.", "dont", "don't", "do not", "t-shirt",
        "t shirt", "red, blue", "red,blue", "red blue", "black/white", "black white", "yes\n", "\tno ", "oclock",
        "o'clock", "Im", "i'm", "(cat)", "cat", "a.m.", "am", "x" + "." * 40, "#1", "&", "it's", "its", "10",
        "ten", "1,2/3", "123", "somebody'd", "somebodyd"]
HAND = [("2", ["Two"] * 10), ("Two", ["Two"] * 10), ("2", ["Two"] * 9 + ["2"]), ("0", ["none"] * 5 + ["zero"] * 5),
        ("1,000", ["1,000"] * 4 + ["1000"] * 6), ("5", ["$5"] * 8 + ["5"] * 2), (".5", [".5"] * 8 + ["5"] * 2),
        ("don't", ["dont"] * 3 + ["do not"] * 7), ("yes", ["yes"] + ["no"] * 9)]


def load_official(repo: Path):
    """The official VQAEval class, from its Python 2 source."""
    source = (repo / "PythonEvaluationTools" / "vqaEvaluation" / "vqaEval.py").read_text()
    source = re.sub(r'^(\s*)print (".*")\s*$', r"\1print(\2)", source, flags=re.M)
    module = types.ModuleType("official_vqa_eval")
    exec(compile(source, "vqaEval.py", "exec"), module.__dict__)
    return module.VQAEval


def official_scores(VQAEval, cases: list[tuple[str, list[str]]]) -> list[float]:
    """Each (prediction, answers) scored by the official evaluate(), as fractions."""
    qa = {q: {"question_id": q, "question_type": "t", "answer_type": "other",
              "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ans)]}
          for q, (_, ans) in enumerate(cases)}
    gts = types.SimpleNamespace(qa=qa, getQuesIds=lambda: list(qa))
    res = types.SimpleNamespace(qa={q: {"question_id": q, "answer": p} for q, (p, _) in enumerate(cases)})
    evaluator = VQAEval(gts, res, n=10)
    evaluator.updateProgress = lambda progress: None
    evaluator.evaluate()
    return [evaluator.evalQA[q] / 100 for q in range(len(cases))]


def load_softscore(repo: Path):
    """tools/compute_softscore.py with stand-ins for the modules it imports but these functions do not use."""
    for name in ("cPickle", "dataset", "utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["dataset"].Dictionary = object
    source = (repo / "tools" / "compute_softscore.py").read_text()
    module = types.ModuleType("official_softscore")
    module.__file__ = str(repo / "tools" / "compute_softscore.py")
    exec(compile(source.split("if __name__ == '__main__':")[0], "compute_softscore.py", "exec"), module.__dict__)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", type=Path, required=True, help="local checkout of GT-Vision-Lab/VQA")
    parser.add_argument("--softscore-repo", type=Path, help="local checkout of hengyuan-hu/bottom-up-attention-vqa")
    parser.add_argument("--random", type=int, default=20000, help="random questions besides the hand-made ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    cases = list(HAND)
    for _ in range(args.random):
        spellings = rng.sample(POOL, rng.randint(1, 4))  # few distinct spellings, so that matches happen
        prediction = rng.choice(spellings) if rng.random() < 0.7 else rng.choice(POOL)
        cases.append((prediction, [rng.choice(spellings) for _ in range(10)]))
    official = official_scores(load_official(args.official_repo), cases)
    ours = [vqa_accuracy(p, a) for p, a in cases]
    differ = [(c, o, m) for c, o, m in zip(cases, official, ours) if abs(o - m) > 1e-12]
    rows = [{"what": "VQA accuracy per question (official evaluate vs vqa_accuracy)", "cases": len(cases),
             "differ": len(differ), "max_abs_diff": max(abs(o - m) for o, m in zip(official, ours)),
             "mean_official": round(sum(official) / len(official), 6), "mean_ours": round(sum(ours) / len(ours), 6)}]
    if args.softscore_repo:
        soft = load_softscore(args.softscore_repo)
        words = POOL + [f"{a} {b}" for a in POOL[:20] for b in POOL[:20]]
        bad = [w for w in words if soft.preprocess_answer(w) != preprocess_answer(w)]
        bad_scores = [n for n in range(12) if soft.get_score(n) != answer_score(n)]
        rows.append({"what": "released preprocess_answer / get_score", "cases": len(words) + 12,
                     "differ": len(bad) + len(bad_scores), "max_abs_diff": 0 if not bad + bad_scores else "-",
                     "mean_official": "-", "mean_ours": "-"})
    print_table(rows, ["what", "cases", "differ", "max_abs_diff", "mean_official", "mean_ours"])
    for (prediction, answers), o, m in differ[:5]:
        print(f"  differs: {prediction!r} vs {answers}: official {o}, ours {m}")
    write_json(args.out / "vqa_eval_parity.json", "vqa_eval_parity.py", argv, "cpu", rows)
    return 0 if all(r["differ"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
