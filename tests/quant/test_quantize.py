"""quant end to end on a briefly trained tiny model: drift per method is finite and
ordered, quantized checkpoints round-trip exactly and run through the runtime."""

import json

import pytest
import torch
from safetensors import safe_open

from fanformer.checkpoint import load_model
from fanformer.errors import FANformerError
from fanformer.tokenizer import load_tokenizer
from fanformer.quant import AWQConfig, GPTQConfig, QuantLinear, RTNConfig, quantize
from fanformer.quant.calibration import calibration_tokens
from fanformer.quant.checkpoint import REPORT_FILE, load_quantized_model, quantize_checkpoint, save_quantized
from fanformer.runtime import GenerationConfig, drift, eval_tokens, fp16_reference, generate, load_backend, reference_greedy

CALIB = dict(calib_samples=32, calib_seq_len=64)
METHODS = {"rtn8": RTNConfig(bits=8, group_size=32), "rtn4": RTNConfig(bits=4, group_size=32),
           "gptq4": GPTQConfig(bits=4, group_size=32, **CALIB),
           "gptq4-act-asym": GPTQConfig(bits=4, group_size=32, sym=False, act_order=True, **CALIB),
           "awq4": AWQConfig(bits=4, group_size=32, **CALIB),
           "awq4-asym": AWQConfig(bits=4, group_size=32, sym=False, **CALIB),
           "rtn3": RTNConfig(bits=3, group_size=-1, keep=("*.fan.proj",)),
           "awq3": AWQConfig(bits=3, group_size=-1, keep=("*.fan.proj",), **CALIB)}


@pytest.fixture(scope="module")
def quantized(trained, corpus, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {name: (quantize_checkpoint(trained, config, root / name, calib_data=[str(corpus)], cache_dir=cache_dir,
                                       progress=False), root / name) for name, config in METHODS.items()}


@pytest.fixture(scope="module")
def drifts(trained, quantized, corpus, cache_dir):
    reference = fp16_reference(trained)
    tokens = eval_tokens(reference.tokenizer, [str(corpus)], "test", 4000, cache_dir)
    return {name: drift(load_backend(path), reference, tokens, ctx=64).to_dict()
            for name, (_, path) in quantized.items()}


def test_drift_is_finite_and_ordered(drifts):
    for result in drifts.values():
        assert all(torch.isfinite(torch.tensor(result[k])) for k in ("kl_mean", "ppl_change"))
    assert drifts["rtn8"]["kl_mean"] < drifts["rtn4"]["kl_mean"]
    assert drifts["gptq4"]["kl_mean"] <= drifts["rtn4"]["kl_mean"]
    assert drifts["gptq4-act-asym"]["kl_mean"] <= drifts["rtn4"]["kl_mean"]
    assert drifts["awq4"]["kl_mean"] <= drifts["rtn4"]["kl_mean"]
    assert drifts["awq4-asym"]["kl_mean"] <= drifts["rtn4"]["kl_mean"]
    assert drifts["awq3"]["kl_mean"] <= drifts["rtn3"]["kl_mean"]
    assert drifts["rtn8"]["top1_agreement"] > 0.97


def test_checkpoint_layout(quantized):
    report, path = quantized["gptq4-act-asym"]
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True,
        "checkpoint_format": "gptq"}
    assert isinstance(qc["version"], int) and config["model_type"] == "fanformer"
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                "generation_config.json", REPORT_FILE}
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("blocks.0.attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("blocks.0.attn.fan.proj.bias").dtype == torch.float32
    assert {"blocks.0.attn.fan.proj.qweight", "blocks.0.attn.fan.proj.qzeros", "blocks.0.attn.fan.proj.scales",
            "blocks.0.attn.fan.proj.g_idx", "blocks.0.attn.fan.proj.bias", "lm_head.weight", "embed.weight"} <= keys
    assert "blocks.0.attn.q_proj.weight" not in keys
    saved = json.loads((path / REPORT_FILE).read_text())
    assert saved["layers"].keys() == report["layers"].keys()
    assert all(layer["metric"] == "gptq_loss" and layer["error"] >= 0 for layer in saved["layers"].values())


def test_save_load_gives_same_logits(trained, corpus, cache_dir, tmp_path):
    model, tokenizer = load_model(trained), load_tokenizer(trained)
    # 3 bits packs only widths that are multiples of 32: the FAN projection (48 outputs) stays float.
    config = GPTQConfig(bits=3, group_size=-1, act_order=True, keep=("*.fan.proj",), **CALIB)
    calibration = calibration_tokens(tokenizer, [str(corpus)], 32, 64, cache_dir=cache_dir)
    report = quantize(model, config, calibration, progress=False)
    save_quantized(tmp_path / "q", model, tokenizer, config, report)
    loaded = load_quantized_model(tmp_path / "q")
    assert isinstance(loaded.blocks[1].ffn.down_proj, QuantLinear)
    ids = calibration[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_runtime_runs_quantized_checkpoint(quantized):
    backend = load_backend(quantized["gptq4"][1])
    assert backend.info.format == "pytorch"
    prompt = "def "
    out = generate(backend, [prompt], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    assert out.token_ids == reference_greedy(backend, backend.tokenizer.encode(prompt).ids, 12)[:len(out.token_ids)]


def test_float_loader_refuses_quantized_checkpoint(quantized):
    with pytest.raises(FANformerError, match="quantized checkpoint"):
        load_model(quantized["rtn4"][1])
