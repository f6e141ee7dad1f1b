"""Hostile quantized checkpoints: GPTQ tensors and quantization_config values that would
index out of range, divide by zero or run on the wrong dtype are refused at load, by name."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.quant.checkpoint import load_quantized_model, quantize_checkpoint
from fanformer.quant.config import RTNConfig
from fanformer.tokenizer import train_tokenizer

LAYER = "blocks.0.attn.q_proj"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, 400)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hostile-gptq")
    save_checkpoint(root / "float", FANformer(FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size())),
                    tokenizer)
    quantize_checkpoint(root / "float", RTNConfig(bits=4, group_size=32), root / "gptq", progress=False)
    return root / "gptq"


@pytest.fixture
def copy(quantized, tmp_path):
    return shutil.copytree(quantized, tmp_path / "gptq")


def edit_qconfig(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensor(path, key, edit):
    state = load_file(str(path / "model.safetensors"))
    state[key] = edit(state[key])
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("group_size, message", [(0, "group_size is 0; it must be positive"),
                                                 (-5, "group_size is -5; it must be positive"),
                                                 (48, "group_size 48 does not divide")])
def test_group_size_is_checked(copy, group_size, message):
    edit_qconfig(copy, group_size=group_size)
    with pytest.raises(FANformerError, match=message):
        load_quantized_model(copy)


@pytest.mark.parametrize("value", [2, -1, 2**31 - 1])
def test_g_idx_out_of_range_is_named(copy, value):
    def edit(g_idx):
        g_idx = g_idx.clone()
        g_idx[7] = value
        return g_idx
    edit_tensor(copy, f"{LAYER}.g_idx", edit)
    with pytest.raises(FANformerError, match=rf"{LAYER}\.g_idx holds group indices .* outside 0\.\.1"):
        load_quantized_model(copy)


@pytest.mark.parametrize("suffix", ["qweight", "qzeros", "g_idx"])
def test_float_packed_tensors_are_refused(copy, suffix):
    edit_tensor(copy, f"{LAYER}.{suffix}", lambda t: t.float())
    with pytest.raises(FANformerError, match=rf"{LAYER}\.{suffix} is float32, expected int32"):
        load_quantized_model(copy)


def test_nan_scales_are_named(copy):
    def edit(scales):
        scales = scales.clone()
        scales[0, 0] = float("nan")
        return scales
    edit_tensor(copy, f"{LAYER}.scales", edit)
    with pytest.raises(FANformerError, match=rf"{LAYER}\.scales holds 1 NaN"):
        load_quantized_model(copy)


def test_the_untouched_copy_loads(copy):
    assert load_quantized_model(copy).get_submodule(LAYER).g_idx.max() == 1


@pytest.fixture(scope="module")
def bnb_checkpoints(quantized):
    from fanformer.quant.config import BnbInt8Config, BnbNF4Config

    root = quantized.parent
    for name, config in (("nf4", BnbNF4Config()), ("int8", BnbInt8Config())):
        quantize_checkpoint(root / "float", config, root / name, progress=False)
    return root


@pytest.mark.parametrize("kind, key, edit, message", [
    ("nf4", f"{LAYER}.weight", lambda t: t[: t.shape[0] // 2], "bytes of 4-bit codes"),
    ("nf4", f"{LAYER}.weight.absmax", lambda t: t[:-1], r"weight\.absmax holds 63 values; the weight's shape needs 64"),
    ("nf4", f"{LAYER}.weight", lambda t: t.float(), "expected bitsandbytes' packed uint8 codes"),
    ("int8", f"{LAYER}.weight_format", lambda t: torch.tensor(255, dtype=torch.uint8), "weight_format is 255"),
    ("int8", "blocks.0.attn.fan.proj.bias", lambda t: torch.cat([t, t]), r"fan\.proj\.bias is torch.float32 \(96,\)"),
])
def test_bitsandbytes_tensors_are_checked(bnb_checkpoints, tmp_path, kind, key, edit, message):
    copy = shutil.copytree(bnb_checkpoints / kind, tmp_path / kind)
    edit_tensor(copy, key, edit)
    with pytest.raises(FANformerError, match=message):
        load_quantized_model(copy)
