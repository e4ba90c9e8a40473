"""`vilbert-train`'s bad inputs, fifth hunt: model configs no model can be built or trained with,
tokenizer folders without a vocabulary, recipe.json and sample JSON that are not objects, and the
messages for a quoted glob, uncounted shards and sample keys holding a dot."""
from __future__ import annotations

import io
import json
import tarfile

import click
import numpy as np
import pytest

from pipelines.data.loader import DataConfig, make_loader
from pipelines.data.shards import DataWarning, expand_shards, read_recipe, uncounted
from pipelines.data.tokenization import load_tokenizer
from pipelines.synthetic.scenes import SyntheticTask
from pipelines.synthetic.shards import write_shards as write_synthetic_shards
from pipelines.synthetic.shards import write_vocab as write_synthetic_vocab
from pipelines.train_cli import main
from vilbert import ViLBertConfig, load_preset, preset_names

from shards import RECIPE, make_sample, write_shards, write_tar, write_vocab

SMALL = dict(feature_dim=16, num_classes=6)
TASK = SyntheticTask(feature_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_synthetic_shards(TASK, root / "train", 32, seed=0, shard_size=16)
    write_synthetic_vocab(root / "vocab.txt")
    return root


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return str(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def args(corpus, out, *extra):
    return [str(corpus / "train"), "--out", str(out), "--preset", "vilbert-tiny",
            "--tokenizer", str(corpus / "vocab.txt"),
            "--set", "max_position_embeddings=16", "--max-seq-len", "8",
            "--batch-size", "8", "--micro-batch-size", "8", "--workers", "0", "--shuffle-buffer", "8",
            "--max-steps", "1", "--save-every", "100", "--seed", "0", *extra]


def config(shards, vocab, **kw) -> DataConfig:
    return DataConfig(shards=shards, tokenizer=vocab, **{"num_workers": 0, "batch_size": 8, **kw})


# ---- 1. model configs -------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, rule", [
    ("hidden_size", -8, ">= 1"), ("hidden_size", 0, ">= 1"), ("intermediate_size", 0, ">= 1"),
    ("num_attention_heads", 0, ">= 1"), ("v_num_attention_heads", 0, ">= 1"),
    ("bi_num_attention_heads", 0, ">= 1"), ("type_vocab_size", 0, ">= 1"), ("v_geometry_dim", 0, ">= 1"),
    ("vocab_size", 0, ">= 1"), ("max_position_embeddings", 0, ">= 1"), ("v_target_size", -1, ">= 1"),
    ("num_hidden_layers", 0, ">= 1"), ("num_task_tokens", -1, ">= 0"),
    ("initializer_range", -1, ">= 0"), ("layer_norm_eps", 0, "> 0"), ("hidden_dropout_prob", 2, r"\[0, 1\]"),
    ("initializer_range", float("nan"), "finite"), ("layer_norm_eps", float("inf"), "finite"),
    ("visual_scale_text_init", float("-inf"), "finite"), ("attention_probs_dropout_prob", float("nan"), "finite"),
])
def test_a_config_no_model_can_be_built_with_is_one_line_naming_the_field(field, value, rule):
    with pytest.raises(ValueError, match=rf"^config field {field}={value!r}: must be .*{rule}"):
        load_preset("vilbert-tiny", **{field: value})
    with pytest.raises(ValueError, match=rf"^config field {field}={value!r}"):
        ViLBertConfig.from_dict({**load_preset("vlbert-tiny").to_dict(), field: value})


def test_task_tokens_need_one_only_when_used_and_the_presets_and_official_configs_still_validate():
    assert load_preset("vilbert-tiny", num_task_tokens=0).num_task_tokens == 0  # no task tokens: unused
    with pytest.raises(ValueError, match=r"num_task_tokens=0: must be .*>= 1 with task_specific_tokens"):
        load_preset("vilbert-tiny", num_task_tokens=0, task_specific_tokens=True)
    for name in preset_names():
        ViLBertConfig.from_dict(load_preset(name).to_dict())
    official = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "v_hidden_size": 1024, "v_num_hidden_layers": 6, "v_num_attention_heads": 8,
                "v_intermediate_size": 1024, "bi_hidden_size": 1024, "bi_num_attention_heads": 8,
                "v_initializer_range": 0.02, "pooling_method": "mul", "hidden_act": "gelu"}
    assert ViLBertConfig.from_official_dict(official) == load_preset("vilbert-base")


@pytest.mark.parametrize("setting, said", [("hidden_size=-8", "hidden_size=-8: must be a whole number >= 1"),
                                           ("v_num_attention_heads=0", "v_num_attention_heads=0"),
                                           ("initializer_range=-1", "initializer_range=-1: must be a number >= 0"),
                                           ("intermediate_size=0", "intermediate_size=0"),
                                           ("layer_norm_eps=NaN", "layer_norm_eps=nan: must be a finite number")])
def test_set_of_an_impossible_config_field_is_one_line_before_training(corpus, tmp_path, setting, said):
    out = tmp_path / "run"
    with pytest.raises(click.ClickException, match=rf"config field {said}") as raised:
        main(args(corpus, out, "--set", setting))
    assert "\n" not in raised.value.format_message()
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())


# ---- 2. tokenizers ----------------------------------------------------------------------------

def test_a_tokenizer_folder_without_a_vocabulary_is_one_line_naming_it(corpus, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    with pytest.raises(FileNotFoundError, match=rf"^{config_only}: holds neither tokenizer.json nor vocab.txt "
                                                r"\(a tokenizer_config.json alone is no vocabulary\)"):
        load_tokenizer(config_only)
    with pytest.raises(click.ClickException, match="config-only: holds neither tokenizer.json nor vocab.txt"):
        main(args(corpus, tmp_path / "run") + ["--tokenizer", str(config_only)])

    specials = tmp_path / "specials"
    specials.mkdir()
    (specials / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    for path in (specials, specials / "vocab.txt"):
        with pytest.raises(ValueError, match=rf"^{path}: the tokenizer vocabulary has only 5 entries"):
            load_tokenizer(path)
    (specials / "tokenizer_config.json").write_text('{"do_lower_case": true}')  # read by from_pretrained
    with pytest.raises(ValueError, match=rf"^{specials}: the tokenizer vocabulary has only 5 entries"):
        load_tokenizer(specials)
    (specials / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\n")
    assert load_tokenizer(specials).tokenize("Red") == ["red"]


def test_a_tokenizer_json_that_is_not_json_or_not_a_tokenizer_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=rf"^{folder / 'tokenizer.json'}: not valid JSON \(Expecting value"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^{folder}: not a tokenizer \(KeyError"):
        load_tokenizer(folder)


# ---- 3. recipe.json and sample JSON -----------------------------------------------------------

@pytest.mark.parametrize("content, said", [("null", "a JSON null, expected an object"),
                                           ('"detector"', "a JSON string, expected an object"),
                                           ("[1, 2]", "a JSON array, expected an object"),
                                           ("{}", "no detector or weights_hash"),
                                           ('{"detector": "x"}', "no weights_hash")])
def test_a_recipe_json_that_is_not_an_object_of_recipe_fields_is_one_line_naming_it(tmp_path, vocab, content, said):
    write_shards(tmp_path, num_shards=1, per_shard=2, **SMALL)
    (tmp_path / "recipe.json").write_text(content)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'recipe.json'}: {said}"):
        read_recipe(expand_shards(tmp_path))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'recipe.json'}: {said}"):
        make_loader(config(tmp_path, vocab), train=True)


def test_a_sample_json_that_is_not_an_object_is_a_malformed_sample(tmp_path, vocab):
    rng = np.random.default_rng(0)
    odd = {}
    for key, content in (("n", b"null"), ("s", b'"detector"'), ("a", b"[1, 2]")):
        odd[key] = {**make_sample(rng, key, **SMALL), "json": content}
    write_tar(tmp_path / "x-000000.tar", odd)  # the first shard cannot tell the recipe: passed over
    write_tar(tmp_path / "x-000001.tar", {f"g{i}": make_sample(rng, f"g{i}", **SMALL) for i in range(2)})
    urls = expand_shards(tmp_path)
    assert read_recipe(urls) == RECIPE
    loader = make_loader(config(tmp_path, vocab), train=False)
    with pytest.warns(DataWarning) as caught:
        keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == ["g0", "g1"] and loader.error_counts()["bad_samples"] == 3
    messages = "\n".join(str(w.message) for w in caught)
    for kind in ("null", "string", "array"):
        assert f"json: a JSON {kind}, expected an object" in messages


# ---- 4. messages ------------------------------------------------------------------------------

def test_a_quoted_glob_says_globs_are_not_expanded(corpus, tmp_path):
    pattern = str(corpus / "train" / "*.tar")
    with pytest.raises(FileNotFoundError, match=r"glob patterns .* are not expanded.*the folder of the shards, "
                                                r"or a brace pattern such as shard-\{000000\.\.000009\}\.tar"):
        expand_shards(pattern)
    with pytest.raises(click.ClickException, match="are not expanded"):
        main([pattern] + args(corpus, tmp_path / "run")[1:])
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) not found"):  # no glob: as before
        expand_shards(str(corpus / "train" / "nosuch.tar"))


def test_uncounted_shards_say_which_are_unlisted_or_that_every_count_is_0(tmp_path):
    write_shards(tmp_path, num_shards=2, per_shard=2, **SMALL)
    urls = expand_shards(tmp_path)
    assert uncounted(urls) == ""
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 0, "shard-000001.tar": 0}))
    assert uncounted(urls) == "sizes.json gives every one of these 2 shard(s) 0 samples"
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2}))
    assert uncounted(urls) == f"sizes.json does not list {tmp_path / 'shard-000001.tar'}"
    (tmp_path / "sizes.json").unlink()
    assert uncounted(urls) == f"{tmp_path} has no sizes.json"
    assert uncounted(["pipe:cat x.tar"]) == "remote shards have no sizes.json"


def _with_dotted_keys(source, target):
    """`source`'s shards with every member renamed `v1.KEY.EXT` (a key holding a dot)."""
    target.mkdir()
    for path in sorted(source.glob("*.tar")):
        with tarfile.open(path) as src, tarfile.open(target / path.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                info = tarfile.TarInfo(f"v1.{member.name}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    (target / "sizes.json").write_text((source / "sizes.json").read_text())


def test_sample_keys_with_a_dot_are_said_to_be_the_cause(corpus, tmp_path, capsys):
    dotted = tmp_path / "dotted"
    _with_dotted_keys(corpus / "train", dotted)
    with pytest.warns(DataWarning, match=r"skipping sample 'v1': missing member\(s\) json, features.npy.*"
                                         r"members such as v1\.synthetic\d+\.json are there: sample keys may not "
                                         r"contain dots.*splits a member name at its first dot"):
        with pytest.raises(click.ClickException, match="none holds a usable sample"):
            main([str(dotted)] + args(corpus, tmp_path / "run")[1:])
