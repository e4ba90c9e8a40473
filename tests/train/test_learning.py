"""Proof that the model learns a task that needs both streams (CPU, tiny preset)."""
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipelines.synthetic.learning import train_and_evaluate, train_and_evaluate_vlbert

STEPS = 2000  # the alignment loss leaves its plateau after 500-1200 steps (seeds 0-2)


@pytest.mark.slow
def test_coattention_learns_what_text_alone_cannot():
    # the two runs are independent: one process each (two cores), one thread each
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        full = pool.submit(train_and_evaluate, True, STEPS)
        ablation = pool.submit(train_and_evaluate, False, STEPS)
        got, base = full.result(), ablation.result()
    print("\nfull", got, "\nwithout co-attention", base)
    assert got["last_loss"] < got["first_loss"] - 1.0
    assert got["align_accuracy"] >= 0.90
    assert got["mlm_accuracy"] >= 0.90
    # without co-attention the caption's colour cannot be checked against the image: chance level
    assert base["align_accuracy"] <= 0.60 and base["mlm_accuracy"] <= 0.40
    assert got["align_accuracy"] - base["align_accuracy"] >= 0.30
    assert got["mlm_accuracy"] - base["mlm_accuracy"] >= 0.50



@pytest.mark.extended
def test_vlbert_reads_the_colour_of_the_named_shape_from_the_regions():
    """Colours are uniform and independent of the words, so text alone gets 25 % at best.
    (VL-BERT's alignment accuracy stays on its plateau for this budget; see docs/model.md.)"""
    got = train_and_evaluate(True, 1500, 0, 1e-3, arch="vlbert")
    print("\nvlbert-tiny", got)
    assert got["mlm_accuracy"] >= 0.90


# lr 2e-3, batch 32, measured (docs/training.md): masked colour 100 % for seeds 0-2 at 1,500 steps; at batch
# 64 seed 1 is still on the plateau of docs/model.md at 1,000 (69 %) and 1,200 (55 %) steps
VLBERT_STEPS, VLBERT_BATCH = 1500, 32


@pytest.mark.slow
def test_vlbert_objective_reads_colours_and_classifies_masked_rois_from_context():
    """VL-BERT's own objective (MLM with visual clues, masked-RoI classification with the mask vector,
    whole-image element without the replaced regions) on scenes holding every shape once: a masked
    colour is the named shape's region's colour, a masked RoI's class the shape missing from the
    others. With the image removed (every region feature zero, boxes kept) both are at chance (25 %).
    Seed 0 here (two runs in parallel, ~65 s on 2 cores); seeds 1 and 2 in the next test, which CI runs."""
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        full = pool.submit(train_and_evaluate_vlbert, VLBERT_STEPS, 0, 2e-3, batch_size=VLBERT_BATCH)
        ablation = pool.submit(train_and_evaluate_vlbert, VLBERT_STEPS, 0, 2e-3, True, batch_size=VLBERT_BATCH)
        got, base = full.result(), ablation.result()
    print("\nvlbert objective", got, "\nimage removed", base)
    assert got["mlm_accuracy"] >= 0.90 and got["mrc_accuracy"] >= 0.90
    assert base["mlm_accuracy"] <= 0.40 and base["mrc_accuracy"] <= 0.40
    assert got["mlm_accuracy"] - base["mlm_accuracy"] >= 0.50
    assert got["mrc_accuracy"] - base["mrc_accuracy"] >= 0.50


@pytest.mark.extended
def test_vlbert_objective_learns_on_seeds_1_and_2():
    """The same proof on seeds 1 and 2 (the image-removed control of seed 0 above stands for them).
    Deselected from the README's test command to keep it near 10 minutes; .ci/run runs it after
    (`make test-extended`)."""
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        runs = {seed: pool.submit(train_and_evaluate_vlbert, VLBERT_STEPS, seed, 2e-3, batch_size=VLBERT_BATCH)
                for seed in (1, 2)}
        got = {seed: run.result() for seed, run in runs.items()}
    print("\nvlbert objective, seeds 1 and 2", got)
    for seed, metrics in got.items():
        assert metrics["mlm_accuracy"] >= 0.90 and metrics["mrc_accuracy"] >= 0.90, (seed, metrics)
