"""setup_distributed (vilbert-train, vilbert-eval, vilbert-multitask under torchrun) with a partial or
malformed torchrun environment: one line naming what is missing or wrong, never a KeyError."""
import pytest

from pipelines.train.distributed import DistInfo, setup_distributed

TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_torchrun_variables_is_one_process(env):
    assert setup_distributed("cpu") == DistInfo()
    env.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cpu") == DistInfo()


@pytest.mark.parametrize("given, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"WORLD_SIZE": "two"}, "$WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "$WORLD_SIZE=0 is not a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "$RANK='x' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "$RANK=2 is not one of the 2"),
])
def test_a_partial_or_malformed_torchrun_environment_is_one_line(env, given, message):
    for name, value in given.items():
        env.setenv(name, value)
    with pytest.raises(ValueError) as error:
        setup_distributed("cpu")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_vilbert_eval_says_which_variables_are_missing(env, tmp_path, capsys):
    from pipelines.eval_cli import main

    from tasks_data import exit_status

    env.setenv("WORLD_SIZE", "2")
    data = tmp_path / "d"
    data.mkdir()
    status = exit_status(main, ["--task", "vqa", "--data", str(data), "--features", str(data), "--out",
                                str(tmp_path / "out"), "--tokenizer", str(data), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1 and "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
