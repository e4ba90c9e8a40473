"""`--objective vlbert` in the trainer and `vilbert-train`: the objective/architecture rule, the
objective stored and checked on resume, VL-BERT's metrics, and the text-only corpus end to end."""
import numpy as np
import pytest
import torch

from pipelines.data.text_corpus import append_text_rows
from pipelines.synthetic.scenes import SyntheticTask
from pipelines.synthetic.shards import write_shards, write_vocab
from pipelines.train.metrics import read_metrics
from pipelines.train.objectives import resolve_objective
from pipelines.train.trainer import TrainConfig, Trainer
from pipelines.train_cli import main
from vilbert import IGNORE_INDEX, load_pretrained

TASK = SyntheticTask(feature_size=32)


def config(out, **kw):
    base = dict(out=out, preset="vilbert-tiny", batch_size=8, micro_batch_size=8, max_steps=3, lr=2e-3,
                save_every=3, log_every=1, keep_last=2, tensorboard=False,
                model_overrides=dict(vocab_size=TASK.vocab_size, v_feature_size=TASK.feature_size,
                                     v_target_size=TASK.num_classes, max_position_embeddings=16))
    base.update(kw)
    return TrainConfig(**base)


def vlbert_batches(text_rows: int = 4):
    k = 0
    while True:
        rng = np.random.default_rng(k)
        batch = TASK.batch(8, rng, vlbert=True, mask_regions=0.5)
        ids = rng.integers(4, TASK.vocab_size, size=(text_rows, 6))
        labels = np.where(rng.random(ids.shape) < 0.3, ids, IGNORE_INDEX)
        labels[:, 0] = ids[:, 0]
        text = {"input_ids": ids, "attention_mask": np.ones_like(ids), "lm_labels": labels,
                "keys": [f"text:{k}-{i}" for i in range(text_rows)]}
        yield append_text_rows(batch, text)
        k += 1


def test_objective_defaults_and_misfits():
    assert resolve_objective("vilbert", None) == 1 and resolve_objective("vlbert", None) == "vlbert"
    assert resolve_objective("vilbert", "0") == 0
    with pytest.raises(ValueError, match="objective vlbert does not fit arch 'vilbert'"):
        resolve_objective("vilbert", "vlbert")
    with pytest.raises(ValueError, match="objective 1 does not fit arch 'vlbert'"):
        resolve_objective("vlbert", 1)
    with pytest.raises(ValueError, match="0, 1, 2 or vlbert"):
        resolve_objective("vlbert", "mlm")


def test_trainer_refuses_a_misfit_and_a_resume_with_another_objective(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(config(tmp_path / "a", objective="vlbert"))
    t = Trainer(config(tmp_path / "b", objective=1))
    t.fit(iter(TASK.batch(8, np.random.default_rng(k)) for k in range(100)))
    model = load_pretrained(tmp_path / "b" / "checkpoints" / "step-00000003")
    assert model.checkpoint_metadata["train_config"]["objective"] == 1  # stored in config.json
    with pytest.raises(ValueError, match="trained with objective 1, this run asks for 0"):
        Trainer(config(tmp_path / "b", objective=0)).resume()
    assert Trainer(config(tmp_path / "b", objective=1, max_steps=4)).resume()


def test_vlbert_objective_trains_and_logs_its_metrics(tmp_path):
    cfg = config(tmp_path, preset="vlbert-tiny", max_steps=4, save_every=4)
    t = Trainer(cfg)
    assert t.cfg.objective == "vlbert"  # the default for arch vlbert
    before = t.model.backbone.embeddings.mask_feature.detach().clone()
    last = t.fit(vlbert_batches())
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert 0 <= r["mlm_accuracy"] <= 1 and 0 <= r["mlm_text_accuracy"] <= 1 and 0 <= r["mrc_accuracy"] <= 1
        assert r["align_loss"] == 0 and r["mlm_text_loss"] > 0
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["mlm_text_loss"] + r["mrm_loss"], rel=1e-5)
    assert last["mrc_accuracy"] == rows[-1]["mrc_accuracy"]
    # the learned mask vector (zero at init) is trained: masked regions are replaced by it
    assert not torch.equal(t.model.backbone.embeddings.mask_feature.detach(), before)
    meta = load_pretrained(tmp_path / "checkpoints" / "step-00000004").checkpoint_metadata
    assert meta["train_config"]["objective"] == "vlbert"


def test_model_accuracies_split_by_row_kind():
    """accumulate_step's counts against a direct computation on the same output."""
    from pipelines.train.metrics import accumulate_step, new_step_sums

    t = Trainer(config("unused", preset="vlbert-tiny"))
    batch = next(vlbert_batches())
    out, tensors = t._forward(t.model, batch)
    stats = new_step_sums()
    accumulate_step(stats, out, tensors)
    hit = out.mlm_logits.argmax(-1) == out.mlm_labels
    rows = torch.arange(batch["lm_labels"].numel()).view_as(batch["lm_labels"])[batch["lm_labels"] != IGNORE_INDEX]
    text_only = batch["text_only"][rows // batch["lm_labels"].shape[1]]
    assert int(stats["mlm_text_total"]) == int(text_only.sum()) > 0
    assert int(stats["mlm_total"]) == int((~text_only).sum()) > 0
    assert int(stats["mlm_text_correct"]) == int((hit & text_only).sum())
    targets = TASK.batch(8, np.random.default_rng(0), vlbert=True, mask_regions=0.5)["region_targets"]
    region = batch["region_labels"][:8] == 1
    expected = (out.region_logits.argmax(-1) == targets[region].argmax(-1)).sum()
    assert int(stats["mrc_total"]) == int(region.sum()) and int(stats["mrc_correct"]) == int(expected)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlbert-shards")
    write_shards(TASK, root / "train", 64, seed=0, shard_size=32)
    write_vocab(root / "vocab.txt")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["a", "and", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star"]
    (corpus / "book.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(40)) + "\n")
    (corpus / "broken.txt").write_bytes(b"\xff\xfe\x00binary")
    return root


def cli_args(root, out, *extra):
    return [str(root / "train"), "--out", str(out), "--preset", "vlbert-tiny", "--tokenizer", str(root / "vocab.txt"),
            "--max-seq-len", "8", "--batch-size", "8", "--micro-batch-size", "4", "--workers", "0",
            "--shuffle-buffer", "8", "--lr", "1e-3", "--log-every", "1", "--save-every", "2", "--seed", "0", *extra]


def test_cli_text_corpus_end_to_end_resumes_and_counts_bad_files(shards, tmp_path, capsys):
    out = tmp_path / "run"
    corpus = ["--text-corpus", str(shards / "corpus" / "*.txt"), "--text-seq-len", "16"]
    with pytest.warns(Warning, match="broken.txt"):
        main(cli_args(shards, out, "--max-steps", "2", *corpus))
    err = capsys.readouterr().err
    assert "'unreadable_text_files': 1" in err
    meta = load_pretrained(out / "checkpoints" / "step-00000002").checkpoint_metadata
    assert meta["train_config"]["objective"] == "vlbert" and meta["train_config"]["text_ratio"] == 1.0
    main(cli_args(shards, out, "--max-steps", "4", *corpus))  # resumes: the text stream at caption batch 4
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("mlm_text_accuracy" in r and "mrc_accuracy" in r for r in rows)
    assert "text-only MLM accuracy" in capsys.readouterr().out


def test_cli_objective_misfits_are_one_line(shards, tmp_path):
    import click

    with pytest.raises(click.ClickException, match="objective 1 does not fit arch 'vlbert'"):
        main(cli_args(shards, tmp_path / "a", "--max-steps", "1", "--objective", "1"))
    with pytest.raises(click.ClickException, match="--text-corpus is VL-BERT's"):
        main(cli_args(shards, tmp_path / "b", "--max-steps", "1", "--preset", "vilbert-tiny",
                      "--set", "max_position_embeddings=16", "--text-corpus", str(shards / "corpus")))
    with pytest.raises(click.ClickException, match="max_position_embeddings"):
        main(cli_args(shards, tmp_path / "c", "--max-steps", "1", "--text-corpus", str(shards / "corpus")))
