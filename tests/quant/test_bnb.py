"""quant/bnb.py: bitsandbytes LLM.int8() and NF4 on the CPU. Every quantized layer computes
what its stored integers imply (LLM.int8() re-derived here, outlier columns included; NF4
decoded with QLoRA's own table), checkpoints round-trip exactly and load without a float
weight, the PyTorch backend runs them, drift is ordered int8 < nf4, bad input is refused."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from fanformer.checkpoint import load_model
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.tokenizer import load_tokenizer
from fanformer.quant import BnbInt8Config, BnbNF4Config, RTNConfig, quantize
from fanformer.quant.bnb import bnb  # bitsandbytes, imported (quietly) by quant.bnb
from fanformer.quant.bnb import NF4Linear, dequantize_nf4
from fanformer.quant.checkpoint import REPORT_FILE, load_quantized_model, quantize_checkpoint, save_quantized
from fanformer.runtime import GenerationConfig, drift, eval_tokens, fp16_reference, generate, load_backend, perplexity
from fanformer.runtime import reference_greedy

# The 16 NormalFloat levels as printed in QLoRA (Dettmers et al. 2023, appendix E).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
METHODS = {"int8": BnbInt8Config(), "nf4": BnbNF4Config(), "nf4-dq": BnbNF4Config(double_quant=True)}


def cola_model() -> FANformer:
    """Every kind of linear: FAN projection, q/k/v/o, gate/up/down, CoLA factors, a CoLA head."""
    torch.manual_seed(0)
    return FANformer(FANformerConfig.from_name("tiny", cola_rank=0.25, cola_lm_head=True, vocab_size=256)).eval()


def with_head(config):
    return type(config)(**{**config.to_dict(), "lm_head": True})


def quantized_cola(config):
    model = cola_model()
    floats = {name: copy.deepcopy(module) for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    report = quantize(model, config, progress=False)
    return model, floats, report


def llm_int8(x, CB, SCB, bias, threshold):
    """LLM.int8() (Dettmers et al. 2022) from the stored int8 rows CB and their absmax SCB:
    activation rows quantized to int8 from fp16 (absmax over the non-outlier entries), except
    the columns holding an |x| >= threshold, which multiply the dequantized weight in float."""
    x2 = x.reshape(-1, x.shape[-1])
    x16 = x2.half().float()
    outlier = x16.abs() >= threshold
    columns = outlier.any(0)
    kept = x16.masked_fill(outlier, 0)
    row_absmax = kept.abs().amax(1, keepdim=True)
    codes = torch.round(kept * (127 / row_absmax)).masked_fill(columns, 0)
    y = (codes @ CB.float().T) * row_absmax * SCB / 127 ** 2
    y = y + x2[:, columns] @ (CB.float() * SCB[:, None] / 127)[:, columns].T
    return (y if bias is None else y + bias).reshape(*x.shape[:-1], -1)


def nf4_decode(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, W) of a Linear4bit from its bytes: high nibble first, W = NF4[code] * block absmax."""
    state = module.weight.quant_state
    packed = module.weight.data.view(torch.uint8).flatten()
    codes = torch.stack([packed >> 4, packed & 0xF], 1).flatten().long()[:state.shape.numel()]
    absmax = state.absmax.float().repeat_interleave(state.blocksize)[:codes.numel()]
    return codes.reshape(state.shape), (NF4[codes] * absmax).reshape(state.shape)


def relative_error(weight, dequantized) -> float:
    return float((dequantized - weight.detach()).norm() / weight.detach().norm())


# --- Layers ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_every_linear_becomes_a_bnb_module(method):
    model, floats, report = quantized_cola(with_head(METHODS[method]))
    assert set(report["layers"]) == set(floats) and report["kept"] == []
    kinds = {name.rsplit(".", 2)[-2] for name in floats}
    assert kinds >= {"proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert {name.rsplit(".", 1)[-1] for name in floats} == {"lora_a", "lora_b"}
    kind, dtype = (bnb.nn.Linear8bitLt, torch.int8) if method == "int8" else (NF4Linear, torch.uint8)
    for name in floats:
        module = model.get_submodule(name)
        assert type(module) is kind and module.weight.dtype == dtype
        assert not any(p.is_floating_point() and p.dim() == 2 for p in module.parameters())
    assert torch.isfinite(model(torch.randint(0, 256, (1, 16)))).all()


def test_int8_rows_and_forward_follow_llm_int8():
    model, floats, report = quantized_cola(BnbInt8Config(lm_head=True))
    torch.manual_seed(1)
    for name, linear in floats.items():
        module = model.get_submodule(name)
        CB, SCB = module.weight.data, module.weight.SCB
        W16 = linear.weight.detach().half().float()
        torch.testing.assert_close(SCB, W16.abs().amax(1), rtol=0, atol=0)
        mismatch = (CB.float() - torch.round(W16 * 127 / SCB[:, None])).abs()
        assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 0.01  # 127 * (1 / absmax) rounds ties
        dequantized = CB.float() * SCB[:, None] / 127
        assert report["layers"][name]["metric"] == "weight_rel_error"
        assert report["layers"][name]["error"] == pytest.approx(relative_error(linear.weight, dequantized), rel=1e-4)

        x = torch.randn(2, 5, linear.in_features)
        x[..., 3] *= 40  # an outlier feature: |x| > 6 in most rows
        x[1, 2, 0] = -7.5  # and one lone outlier entry
        y = module(x)
        torch.testing.assert_close(y, llm_int8(x, CB, SCB, linear.bias, 6.0), rtol=1e-4, atol=1e-4)
        exact = F.linear(x, dequantized, linear.bias)
        without = llm_int8(x, CB, SCB, linear.bias, float("inf"))  # the same int8 path without decomposition
        assert (y - exact).norm() < 0.5 * (without - exact).norm()
        assert (y - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_nf4_codes_and_forward_follow_the_qlora_table(method):
    model, floats, report = quantized_cola(with_head(METHODS[method]))
    torch.manual_seed(2)
    for name, linear in floats.items():
        module = model.get_submodule(name)
        state = module.weight.quant_state
        assert (state.blocksize, state.quant_type, state.nested) == (64, "nf4", method == "nf4-dq")
        dequantized = dequantize_nf4(module.weight).float()
        x = torch.randn(3, 4, linear.in_features)
        torch.testing.assert_close(module(x), F.linear(x, dequantized, linear.bias), rtol=1e-5, atol=1e-5)
        assert report["layers"][name]["error"] == pytest.approx(relative_error(linear.weight, dequantized), rel=1e-4)
        if linear.in_features % state.blocksize == 0:  # rows of whole blocks: bnb's own call gives the same
            torch.testing.assert_close(bnb.functional.dequantize_4bit(module.weight.data, state).float(),
                                       dequantized, rtol=0, atol=0)
        if state.nested:  # the block absmaxes themselves are 8-bit: no exact decode from the table alone
            assert relative_error(linear.weight, dequantized) < 0.2
            continue
        codes, decoded = nf4_decode(module)
        torch.testing.assert_close(dequantized, decoded, rtol=0, atol=1e-6)
        # Each code is the level nearest to w / absmax of its block (round to nearest).
        scaled = (linear.weight.detach().flatten() / state.absmax.repeat_interleave(64)[:codes.numel()])[:, None]
        gaps = (scaled - NF4).abs()
        assert (gaps.gather(1, codes.flatten()[:, None]) <= gaps.min(1, keepdim=True).values + 1e-6).all()


@pytest.mark.parametrize("options, message", [(dict(threshold=-1.0), "threshold must be"),
                                              (dict(blocksize=48), "blocksize must be one of"),
                                              (dict(compute_dtype="int8"), "compute_dtype must be one of")])
def test_configs_are_validated(options, message):
    cls = BnbInt8Config if "threshold" in options else BnbNF4Config
    with pytest.raises(FANformerError, match=message):
        cls(**options)


def test_already_quantized_model_is_refused():
    model, _, _ = quantized_cola(BnbNF4Config())
    for config in (BnbInt8Config(), RTNConfig(bits=4, group_size=-1)):
        with pytest.raises(FANformerError, match="already quantized"):
            quantize(model, config, progress=False)


# --- Checkpoints and the runtime -------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    return {name: (quantize_checkpoint(trained, config, root / name, progress=False), root / name)
            for name, config in METHODS.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_gives_same_logits(trained, tmp_path, method):
    model, tokenizer = load_model(trained), load_tokenizer(trained)
    config = METHODS[method]
    report = quantize(model, config, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)  # a forward before saving moves bnb's int8 state; the save must not change
    save_quantized(tmp_path / "q", model, tokenizer, config, report)
    loaded = load_quantized_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), before, rtol=0, atol=0)
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for key in saved:
        assert torch.equal(saved[key], reloaded[key]), key


def test_checkpoint_layout(checkpoints):
    report, path = checkpoints["int8"]
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "load_in_8bit", "load_in_4bit", "llm_int8_threshold")} == {
        "quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0}
    assert qc["llm_int8_skip_modules"] == report["kept"] == ["lm_head"]
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.attn.fan.proj.weight").dtype == torch.int8
        assert f.get_tensor("blocks.0.attn.fan.proj.SCB").dtype == torch.float32
        assert f.get_tensor("blocks.0.attn.fan.proj.bias").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    assert {"blocks.0.ffn.down_proj.weight", "blocks.0.ffn.down_proj.SCB", "embed.weight"} <= keys

    report, path = checkpoints["nf4-dq"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                               "bnb_4bit_compute_dtype")} == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        prefix = "blocks.1.attn.q_proj.weight"
        assert {prefix, f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.nested_absmax",
                f"{prefix}.nested_quant_map", f"{prefix}.quant_state.bitsandbytes__nf4"} <= set(f.keys())
        assert f.get_tensor(prefix).dtype == torch.uint8
    saved = json.loads((path / REPORT_FILE).read_text())
    assert saved["layers"].keys() == report["layers"].keys()
    assert all(layer["metric"] == "weight_rel_error" and 0 < layer["error"] < 0.2 for layer in saved["layers"].values())


def test_loading_keeps_the_integers(checkpoints):
    for name, (report, path) in checkpoints.items():
        model = load_quantized_model(path)
        kind = bnb.nn.Linear8bitLt if name == "int8" else NF4Linear
        assert {n for n, m in model.named_modules() if isinstance(m, kind)} == set(report["layers"])
        floats = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dim() == 2]
        assert sorted(floats) == ["embed.weight", "lm_head.weight"]


def test_runtime_runs_bnb_checkpoints(checkpoints, corpus, cache_dir):
    for _, path in checkpoints.values():
        backend = load_backend(path)
        assert backend.info.format == "pytorch"
        prompt = "def "
        out = generate(backend, [prompt], GenerationConfig(max_new_tokens=10, temperature=0))[0]
        expected = reference_greedy(backend, backend.tokenizer.encode(prompt).ids, 10)
        assert out.token_ids == expected[:len(out.token_ids)]
        tokens = eval_tokens(backend.tokenizer, [str(corpus)], "test", 1000, cache_dir)
        assert torch.isfinite(torch.tensor(perplexity(backend, tokens, ctx=64).ppl))


def test_drift_is_finite_and_int8_below_nf4(trained, checkpoints, corpus, cache_dir):
    reference = fp16_reference(trained)
    tokens = eval_tokens(reference.tokenizer, [str(corpus)], "test", 4000, cache_dir)
    drifts = {name: drift(load_backend(path), reference, tokens, ctx=64).to_dict()
              for name, (_, path) in checkpoints.items()}
    for result in drifts.values():
        assert all(torch.isfinite(torch.tensor(result[k])) for k in ("kl_mean", "ppl_change"))
    assert drifts["int8"]["kl_mean"] < drifts["nf4"]["kl_mean"]
    assert drifts["int8"]["kl_mean"] < drifts["nf4-dq"]["kl_mean"]
    assert drifts["int8"]["top1_agreement"] > 0.97


# --- CLI -------------------------------------------------------------------------

def quantize_args(checkpoint, out, *extra) -> list[str]:
    return ["quantize", str(checkpoint), "--out", str(out), "--quiet", *extra]


def test_cli_int8_with_keep_and_lm_head(trained, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(quantize_args(trained, out, "--method", "int8", "--keep", "blocks.1.*", "--lm-head")) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.ffn.down_proj" in printed and "weight_rel_error" in printed and "threshold 6.0" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert "lm_head" in report["layers"] and not any(n.startswith("blocks.1.") for n in report["layers"])
    assert "blocks.1.attn.q_proj" in report["kept"]
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--greedy",
                 "--device", "cpu"]) == 0


def test_cli_nf4_double_quant(trained, tmp_path):
    out = tmp_path / "nf4"
    assert main(quantize_args(trained, out, "--method", "nf4", "--double-quant")) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] and qc["load_in_4bit"]


@pytest.mark.parametrize("flags, message", [
    (["--method", "int8", "--bits", "8"], "--bits does not apply to --method int8"),
    (["--method", "nf4", "--group-size", "64", "--asym"], "--group-size, --sym/--asym do not apply to --method nf4"),
    (["--method", "nf4", "--act-order", "--calib-samples", "4"], "--act-order, --calib-samples do not apply"),
    (["--method", "int8", "--double-quant"], "--double-quant only applies to --method nf4"),
    (["--method", "rtn", "--double-quant"], "--double-quant only applies to --method nf4")])
def test_cli_flags_that_do_not_apply(trained, tmp_path, cli_fails, flags, message):
    cli_fails(quantize_args(trained, tmp_path / "q", *flags), message)
    assert not (tmp_path / "q").exists()


def test_cli_refuses_quantized_checkpoints(checkpoints, tmp_path, cli_fails):
    path = checkpoints["nf4"][1]
    cli_fails(quantize_args(path, tmp_path / "q", "--method", "int8"), "already quantized (bitsandbytes nf4)")
    cli_fails(quantize_args(path, tmp_path / "q", "--method", "rtn", "--group-size", "32"), "already quantized")
    with pytest.raises(FANformerError, match="quantized checkpoint"):
        load_model(path)


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_export_refuses_bnb_checkpoints(checkpoints, tmp_path, cli_fails, fmt):
    cli_fails(["export", checkpoints["int8"][1], "--format", fmt, "--out", tmp_path / "x"],
              "bitsandbytes int8", "export the float checkpoint")
    assert not (tmp_path / "x").exists()


def test_transformers_reads_the_int8_checkpoint(checkpoints):
    pytest.importorskip("accelerate")  # transformers loads no bitsandbytes checkpoint without it
    from transformers import AutoModelForCausalLM

    import fanformer.hf  # noqa: F401  (registers the Auto classes)

    path = checkpoints["int8"][1]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf.model.blocks[0].attn.q_proj) is bnb.nn.Linear8bitLt
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_quantized_model(path)(ids), rtol=0, atol=0)
