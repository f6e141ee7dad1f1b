"""quant/linear.py: QuantLinear computes F.linear with the dequantized weight; every linear
of every block (FAN projection, q/k/v/o, gate/up/down, both CoLA factors) is covered."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.quant import GPTQConfig, QuantLinear, RTNConfig, quantize
from fanformer.quant.grid import group_index
from fanformer.quant.gptq import gptq_quantize
from fanformer.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_equals_linear_with_dequantized_weight(bits):
    torch.manual_seed(bits)
    weight, bias = torch.randn(64, 96), torch.randn(64)
    result = rtn_quantize(weight, bits, 32, sym=False)
    layer = QuantLinear.from_quantized(result, bits, bias)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(layer(x), F.linear(x, result.dequantize(), bias), rtol=0, atol=0)
    assert {k: v.dtype for k, v in layer.state_dict().items()} == {
        "qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
        "bias": torch.float32}
    assert not any(v.is_floating_point() and v.shape == weight.shape for v in layer.state_dict().values())


def test_act_order_layer_forward():
    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    W = torch.randn(32, 64)
    result = gptq_quantize(W, 2 * X.T @ X / 256, 4, 32, sym=True, act_order=True)
    assert not torch.equal(result.g_idx, group_index(64, 32))
    layer = QuantLinear.from_quantized(result, 4, None)
    torch.testing.assert_close(layer(X), X @ result.dequantize().T, rtol=0, atol=0)


def cola_model(**overrides) -> FANformer:
    torch.manual_seed(0)
    return FANformer(FANformerConfig.from_name("tiny", cola_rank=0.25, vocab_size=256, **overrides)).eval()


def test_every_block_linear_is_quantized_including_cola_factors():
    model = cola_model()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    report = quantize(model, RTNConfig(bits=4, group_size=-1), progress=False)
    assert set(report["layers"]) == linears
    assert {n.rsplit(".", 2)[-2] for n in linears} >= {"proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"}
    assert any(n.endswith("lora_a") for n in linears) and any(n.endswith("lora_b") for n in linears)
    assert report["kept"] == ["lm_head"]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in linears)
    assert torch.isfinite(model(torch.randint(0, 256, (1, 16)))).all()


def test_keep_patterns_and_lm_head():
    model = cola_model(cola_lm_head=True)
    report = quantize(model, RTNConfig(bits=8, group_size=-1, keep=("blocks.*.attn.fan.*",), lm_head=True),
                      progress=False)
    assert not any(".fan." in n for n in report["layers"])
    assert "blocks.0.attn.fan.proj.lora_a" in report["kept"]
    assert {"lm_head.lora_a", "lm_head.lora_b"} <= set(report["layers"])
    tied = FANformer(FANformerConfig.from_name("tiny", tie_embeddings=True)).eval()
    assert "lm_head" not in quantize(tied, RTNConfig(bits=8, group_size=-1, lm_head=True), progress=False)["layers"]


def test_keep_pattern_naming_a_cola_layer_keeps_both_factors():
    report = quantize(cola_model(), RTNConfig(bits=8, group_size=-1, keep=("blocks.*.attn.fan.proj",)),
                      progress=False)
    n_layers = cola_model().config.n_layers
    kept = {f"blocks.{i}.attn.fan.proj.{f}" for i in range(n_layers) for f in ("lora_a", "lora_b")}
    assert {n for n in report["kept"] if n.startswith("blocks.")} == kept
    # a pattern matches whole module names, not the start of one
    report = quantize(cola_model(), RTNConfig(bits=8, group_size=-1, keep=("blocks.*.attn.fan.pro",)), progress=False)
    assert not any(n.startswith("blocks.") for n in report["kept"])


def test_group_size_must_divide_every_input_width():
    with pytest.raises(FANformerError, match=r"group size 32 does not divide the input width 16 of .*lora_b"):
        quantize(cola_model(), RTNConfig(bits=4, group_size=32), progress=False)


def test_already_quantized_and_missing_calibration():
    model = cola_model()
    quantize(model, RTNConfig(bits=4, group_size=-1), progress=False)
    with pytest.raises(FANformerError, match="already quantized"):
        quantize(model, RTNConfig(bits=4, group_size=-1), progress=False)
    with pytest.raises(FANformerError, match="calibration"):
        quantize(cola_model(), GPTQConfig(bits=4, group_size=-1), progress=False)


@pytest.mark.parametrize("options, message", [(dict(bits=5), "bits must be one of"),
                                              (dict(group_size=48), "group_size must be one of"),
                                              (dict(calib_samples=0), "calib_samples"),
                                              (dict(percdamp=0), "percdamp")])
def test_configs_are_validated(options, message):
    with pytest.raises(FANformerError, match=message):
        GPTQConfig(**options)
