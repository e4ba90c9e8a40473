"""vilbert-train on the fifth hunt's inputs: a second run into the same --out, a resume with other
settings or from an earlier step of its own history, nan and inf options, --nan-policy stop, an
--out inside the shards, a resume that has nothing left to train, and a text corpus of one huge line."""
import click
import numpy as np
import pytest
from test_train_cli import NaNScenes, args, corpus  # noqa: F401 - the module's shards, as a fixture here too

from common.outputs import out_lock
from pipelines.data.text_corpus import TextCorpus, TextStream
from pipelines.data.tokenization import CaptionTokenizer, load_tokenizer
from pipelines.synthetic.shards import write_shards, write_vocab
from pipelines.train.checkpoints import list_checkpoints
from pipelines.train_cli import main


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    with out_lock(out, "vilbert-train"):  # a run in progress
        with pytest.raises(click.ClickException, match=r"vilbert-train .*pid \d+") as e:
            main(args(corpus, out, "--max-steps", "2"))
    assert "\n" not in e.value.message and not list_checkpoints(out / "checkpoints")
    main(args(corpus, out, "--max-steps", "2"))  # once it is gone, the run goes ahead
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000002"]


def test_a_resume_with_other_settings_is_refused_naming_them(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "3"))
    for extra, said in ((("--batch-size", "24"), "batch_size: 16 then, 24 now"),
                        (("--micro-batch-size", "4"), "micro_batch_size: 8 then, 4 now"),
                        (("--lr", "2e-3"), "lr: 0.001 then, 0.002 now")):
        with pytest.raises(click.ClickException, match=rf"step-00000003: trained with other settings than this "
                                                       rf"run's \({said}\)"):
            main(args(corpus, out, "--max-steps", "6", *extra))
    main(args(corpus, out, "--max-steps", "6"))  # the same options (and a larger --max-steps) resume
    assert list_checkpoints(out / "checkpoints")[-1].name == "step-00000006"
    import csv

    with open(out / "metrics.csv", newline="") as f:  # the rows before the resume are rewritten as written
        rows = list(csv.DictReader(f))
    assert [r["samples"] for r in rows] == [str(16 * int(r["step"])) for r in rows]  # "32", never "32.0"


def test_resuming_an_earlier_step_of_the_runs_own_history_is_refused(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "6"))  # checkpoints at 3 and 6
    earlier = out / "checkpoints" / "step-00000003"
    with pytest.raises(click.ClickException, match=r"--resume .*step-00000003: .*holds later checkpoints "
                                                   r"\(step-00000006\)"):
        main(args(corpus, out, "--max-steps", "4", "--resume", str(earlier)))
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006"]
    main(args(corpus, tmp_path / "branch", "--max-steps", "4", "--resume", str(earlier)))  # a branch elsewhere


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "inf"), ("--epochs", "inf"), ("--warmup", "nan"),
                                           ("--clip-grad", "nan"), ("--weight-decay", "nan"), ("--text-ratio", "1e9"),
                                           ("--bert-lr-scale", "inf")])
def test_nan_and_inf_options_are_usage_errors(corpus, tmp_path, option, value):  # noqa: F811
    with pytest.raises(click.BadParameter) as e:
        main(args(corpus, tmp_path / "run", "--max-steps", "2", option, value))
    assert option in e.value.format_message()
    assert not (tmp_path / "run").exists()


def test_nan_policy_stop_is_one_line_and_out_inside_the_shards_is_refused(corpus, tmp_path):  # noqa: F811
    write_shards(NaNScenes(feature_size=32), tmp_path / "nan" / "train", 32, seed=0, shard_size=32)
    write_vocab(tmp_path / "nan" / "vocab.txt")
    with pytest.raises(click.ClickException, match=r"^non-finite loss at step 1; batch keys: .*: stopped "
                                                   r"\(--nan-policy stop\)") as e:
        main(args(tmp_path / "nan", tmp_path / "run", "--max-steps", "2", "--nan-policy", "stop"))
    assert "\n" not in e.value.message
    inside = corpus / "train" / "run"
    with pytest.raises(click.ClickException, match=r"--out .*train/run lies inside SHARDS"):
        main(args(corpus, inside, "--max-steps", "1"))
    assert not inside.exists()
    inside = corpus / "val" / "run"
    with pytest.raises(click.ClickException, match=r"^--out .*val/run lies inside --eval-shards"):
        main(args(corpus, inside, "--max-steps", "1", "--eval-shards", str(corpus / "val")))
    assert not inside.exists()


def test_a_resume_with_nothing_left_to_train_says_so(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    main(args(corpus, out, "--max-steps", "3"))
    capsys.readouterr()
    main(args(corpus, out, "--max-steps", "2"))
    assert "note: the run is at step 3, --max-steps 2: nothing to train" in capsys.readouterr().err


def test_a_corpus_of_one_huge_line_gives_the_rows_of_the_whole_line_from_its_start(tmp_path, monkeypatch):
    vocab = write_vocab(tmp_path / "vocab.txt")
    tokenizer = CaptionTokenizer(load_tokenizer(vocab), max_seq_len=8)
    words = ["red", "green", "blue", "circle", "square", "and", "a"]
    rng = np.random.default_rng(0)
    (tmp_path / "dump.txt").write_text(" ".join(rng.choice(words, 200_000)) + "\n")  # no newline in it
    text = TextCorpus([tmp_path / "dump.txt"], errors=None)
    stream = TextStream(text, tokenizer, seq_len=16, seed=3)
    seen = []
    inner = tokenizer.tokenizer
    monkeypatch.setattr(tokenizer, "tokenizer", lambda text, **kw: seen.append(len(text)) or inner(text, **kw))
    cut = stream.rows(0, 4)
    assert max(seen) < 2000  # the 1.2 MB line is never tokenized whole
    monkeypatch.setattr(TextStream, "_words_needed", lambda self: 10 ** 9)  # no cut: the whole line each row
    whole = stream.rows(0, 4)
    assert all(np.array_equal(cut[k], whole[k]) for k in cut)


def test_shards_without_a_sample_count_say_why(corpus, tmp_path):  # noqa: F811
    import json
    import shutil

    shutil.copytree(corpus / "train", tmp_path / "train")
    sizes = tmp_path / "train" / "sizes.json"
    sizes.write_text(json.dumps(dict.fromkeys(json.loads(sizes.read_text()), 0)))
    with pytest.raises(click.ClickException, match=r"no sample count \(sizes.json gives every one of these 3 "
                                                   r"shard\(s\) 0 samples\); pass --samples-per-epoch$"):
        main([str(tmp_path / "train")] + args(corpus, tmp_path / "run", "--max-steps", "2")[1:])
