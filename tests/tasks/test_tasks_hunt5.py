"""The fifth hunt's special files for the model and the tokenizer: an `--init-preset` config or a
tokenizer (vocab.txt, tokenizer.json, the --tokenizer itself) that is a FIFO is one line naming it and
what was expected, never "unknown preset" / "no vocab.txt", and never a hang."""
import os

import click
import pytest
from fifo_watch import returns_without_blocking

from pipelines.data.tokenization import load_tokenizer as load_train_tokenizer
from pipelines.eval_cli import load_model
from pipelines.tasks.text import load_tokenizer as load_task_tokenizer

from tasks_data import write_vocab


def _fifo(path):
    os.mkfifo(path)
    return path


def test_an_init_preset_that_is_a_fifo_or_a_folder_is_one_line_naming_it(tmp_path):
    for path, kind in ((_fifo(tmp_path / "config.json"), "a FIFO"), (_fifo(tmp_path / "config"), "a FIFO"),
                       (tmp_path, "a directory")):
        error = returns_without_blocking(lambda p=path: load_model(None, None, None, str(p), "cpu"), [path])
        assert isinstance(error, ValueError), error
        assert str(error) == f"{path}: not a regular file ({kind}): expected a model config JSON"
    with pytest.raises(FileNotFoundError, match="nosuch.json: a model config JSON not found"):
        load_model(None, None, None, str(tmp_path / "nosuch.json"), "cpu")
    with pytest.raises(ValueError, match="unknown preset 'vilbert-huge'"):  # a name is still a preset name
        load_model(None, None, None, "vilbert-huge", "cpu")
    with pytest.raises(click.UsageError):
        load_model(None, None, None, None, "cpu")


@pytest.mark.parametrize("load", [load_task_tokenizer, load_train_tokenizer], ids=["vilbert-eval", "vilbert-train"])
def test_a_tokenizer_that_is_a_fifo_is_one_line_naming_the_file(tmp_path, load):
    vocab = _fifo(tmp_path / "vocab.txt")
    error = returns_without_blocking(lambda: load(vocab), [vocab])
    assert isinstance(error, ValueError), error
    assert str(error) == f"{vocab}: not a regular file (a FIFO): expected a vocab.txt or a tokenizer directory"
    error = returns_without_blocking(lambda: load(tmp_path), [vocab])  # the folder holding it
    assert isinstance(error, ValueError) and str(error) == f"{vocab}: not a regular file (a FIFO): " \
                                                           "expected the tokenizer's vocab.txt", error
    folder = tmp_path / "hf"
    write_vocab(folder)
    tokenizer_json = _fifo(folder / "tokenizer.json")
    error = returns_without_blocking(lambda: load(folder), [tokenizer_json])
    assert isinstance(error, ValueError) and "tokenizer.json: not a regular file (a FIFO)" in str(error), error
    os.unlink(tokenizer_json)
    assert len(load(folder)) > 5  # the same folder without the FIFO loads


def test_a_checkpoint_of_an_earlier_version_resumes_with_a_warning_naming_what_it_lacks(tmp_path, capsys, caplog):
    """Checkpoints made before the starting model and the answer list were recorded were refused:
    "model: None then, 'checkpoint …' now". Settings that a checkpoint never recorded are not compared."""
    import torch

    from pipelines.train.checkpoints import STATE_NAME, list_checkpoints

    from tasks_data import make_vqa, run_cli, tiny_checkpoint

    d = {"root": tmp_path, "data": make_vqa(tmp_path), "vocab": write_vocab(tmp_path),
         "ckpt": tiny_checkpoint(tmp_path / "ckpt")}
    args = ("--checkpoint", str(d["ckpt"]), "--train-steps", "4", "--batch-size", "8", "--val-split", "none")
    assert run_cli("vqa", d, tmp_path / "out", *args) == 0
    [ckpt] = list_checkpoints(tmp_path / "out" / "checkpoints")
    state = torch.load(ckpt / STATE_NAME, weights_only=True)
    for key in ("model", "task answers", "task answer_count"):  # as an earlier version wrote it
        del state["settings"][key]
    torch.save(state, ckpt / STATE_NAME)
    with caplog.at_level("WARNING", logger="vilbert.eval"):
        assert run_cli("vqa", d, tmp_path / "out", *args) == 0
    assert f"{ckpt}: made by an earlier version, which did not record model, task answer_count, task answers: " \
           "resuming without comparing them" in caplog.text
    capsys.readouterr()
    state["settings"]["lr"] = 1.0  # a setting it did record is still compared
    torch.save(state, ckpt / STATE_NAME)
    assert run_cli("vqa", d, tmp_path / "out", *args) == 1
    assert "with other settings than this run's (lr: 1.0 then" in capsys.readouterr().err
