"""Hostile checkpoint files: each is refused with one FANformerError naming the file, the
field and the problem, before a model of the claimed size is built (fanformer/validate.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fanformer import checkpoint as ckpt
from fanformer.checkpoint import load_generation_config, load_model, save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.tokenizer import load_tokenizer, train_tokenizer
from fanformer.validate import foreign_errors, read_json

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin 🙂\n"] * 10


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, 400)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "ckpt"
    save_checkpoint(path, FANformer(FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size())),
                    tokenizer)
    return path


@pytest.fixture
def copy(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("field, value, message", [
    ("p", "0.25", "p must be a finite number, got '0.25'"),
    ("norm_eps", float("nan"), "norm_eps must be a finite number"),
    ("tie_embeddings", 1, "tie_embeddings must be a bool, got 1"),
    ("n_layers", 1.5, "n_layers must be a positive integer, got 1.5"),
    ("norm", ["pre"], "norm must be a str"),
])
def test_config_values_of_the_wrong_type(copy, field, value, message):
    edit_config(copy, **{field: value})
    with pytest.raises(FANformerError, match="config.json: invalid model config") as err:
        load_model(copy)
    assert message in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 10**9, "n_layers is 1,000,000,000, more than the"),
    ("n_layers", 5, "n_layers is 5, but the weights file holds blocks 0..1"),
    ("vocab_size", 2**40, "vocab_size is 1,099,511,627,776, more than the"),
    ("d_model", 2**62, "d_model is"),
])
def test_sizes_beyond_the_weights_file_are_refused_before_building(copy, monkeypatch, field, value, message):
    edit_config(copy, **{field: value})
    monkeypatch.setattr(ckpt, "FANformer", lambda config: pytest.fail("built a model from a damaged config"))
    with pytest.raises(FANformerError, match=message.replace(".", r"\.")):
        load_model(copy)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nests its JSON too deeply"),
    ('{"model_type": "fanformer", ', "is not valid JSON"),
    ("[]", "holds a JSON list, expected a dict"),
])
def test_damaged_config_json_says_what_is_wrong(copy, text, message):
    (copy / "config.json").write_text(text)
    with pytest.raises(FANformerError, match=message):
        load_model(copy)


def test_a_weight_of_another_dtype_is_named(copy):
    edit_weights(copy, lambda s: s.update({"blocks.0.attn.q_proj.weight": s["blocks.0.attn.q_proj.weight"].int()}))
    with pytest.raises(FANformerError, match="tensor blocks.0.attn.q_proj.weight is int32, expected a float type"):
        load_model(copy)


def test_fp16_weights_still_load(copy, good):
    edit_weights(copy, lambda s: s.update({k: v.half() for k, v in s.items()}))
    torch.testing.assert_close(load_model(copy).embed.weight.float(), load_model(good).embed.weight.half().float())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(copy, value):
    def poison(state):
        state["blocks.1.ffn.down_proj.weight"][3, 5] = value
    edit_weights(copy, poison)
    with pytest.raises(FANformerError, match="tensor blocks.1.ffn.down_proj.weight holds 1 NaN or infinite"):
        load_model(copy)


def test_damaged_vocabulary_is_one_error(copy):
    data = json.loads((copy / "tokenizer.json").read_text())
    data["model"]["merges"].append(["no-such-token", "another"])
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FANformerError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(copy)


def test_a_rust_panic_becomes_one_error_and_other_base_exceptions_pass():
    """pyo3's PanicException derives from BaseException; it is caught by name (its class
    cannot be imported), and nothing else outside Exception is."""
    PanicException = type("PanicException", (BaseException,), {})
    with pytest.raises(FANformerError, match=r"loading x \(PanicException: index out of bounds\)"):
        with foreign_errors("loading x"):
            raise PanicException("index out of bounds")
    with pytest.raises(KeyboardInterrupt):
        with foreign_errors("loading x"):
            raise KeyboardInterrupt
    with pytest.raises(MemoryError):  # a missed bound stays visible
        with foreign_errors("loading x"):
            raise MemoryError


@pytest.mark.parametrize("content, message", [
    ({"temperature": "hot"}, "temperature is 'hot', expected a number"),
    ({"do_sample": 1}, "do_sample is 1, expected true or false"),
    ({"top_p": 7}, "top_p is 7, out of range"),
    ({"top_k": -3}, "top_k is -3, out of range"),
])
def test_generation_config_values_are_checked(copy, content, message):
    (copy / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(FANformerError, match=f"generation_config.json: {message}"):
        load_generation_config(copy)


def test_read_json_names_the_file_for_undecodable_bytes(tmp_path):
    (tmp_path / "x.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FANformerError, match="x.json is not UTF-8"):
        read_json(tmp_path / "x.json")
