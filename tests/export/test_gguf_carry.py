"""A quantized checkpoint exported to GGUF keeps its integers (export/gguf_carry.py):
4-bit sym -> Q4_0 and 8-bit -> Q8_0 dequantize to exactly the checkpoint's weights,
4-bit asym -> Q4_1 within Q4_1's f16 rounding of m; act-order groups that cut a block of
32 are re-quantized with the error logged; the GGUF backend runs the result and decodes
as the PyTorch backend does on the quantized checkpoint."""

import copy
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf import quants

from fanformer.export import gguf_format as names
from fanformer.export.gguf_export import export_gguf
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer
from fanformer.quant import AWQConfig, GPTQConfig, RTNConfig, quantize
from fanformer.quant.checkpoint import save_quantized
from fanformer.quant.linear import QuantLinear
from fanformer.runtime import load_backend, reference_greedy

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def trained(overfit_tiny):
    """(model, tokenizer, ids): the shared overfit tiny model (tests/export/conftest.py)."""
    return overfit_tiny


def quantized_dir(trained, tmp_path, config, calibration=None):
    model, tokenizer, _ = trained
    model = copy.deepcopy(model)
    report = quantize(model, config, calibration, progress=False)
    out = tmp_path / "q"
    save_quantized(out, model, tokenizer, config, report)
    return out, model


def gguf_tensors(path):
    reader = GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def carried_weights(model, path):
    """{gguf name: (weight from the GGUF file, the quantized checkpoint's weight, type)}."""
    reader, tensors = gguf_tensors(path)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            t = tensors[names.gguf_tensor_name(name + ".weight")]
            w = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(module.out_features, module.in_features)
            out[t.name] = (w, module.dequantized_weight().numpy(), t.tensor_type)
    assert out
    return reader, out


@pytest.mark.parametrize("method, bits, sym, qtype, file_type", [
    ("rtn", 4, True, Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    ("rtn", 8, True, Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    ("rtn", 4, False, Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    ("awq", 4, True, Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),  # AWQ's scales live in norms and biases
])
def test_integers_survive_and_backends_agree(trained, tmp_path, caplog, method, bits, sym, qtype, file_type):
    if method == "awq":
        config = AWQConfig(bits=bits, group_size=32, sym=sym, calib_samples=8, calib_seq_len=32)
        calibration = torch.randint(0, trained[1].get_vocab_size(), (8, 32), generator=torch.Generator().manual_seed(0))
        qdir, model = quantized_dir(trained, tmp_path, config, calibration)
    else:
        qdir, model = quantized_dir(trained, tmp_path, RTNConfig(bits=bits, group_size=32, sym=sym))
    with caplog.at_level(logging.INFO):
        path = export_gguf(qdir, tmp_path / "q.gguf")
    reader, weights = carried_weights(model, path)
    assert int(reader.get_field(names.GENERAL_FILE_TYPE).contents()) == int(file_type)
    for name, (w_gguf, w_quant, stored) in weights.items():
        assert stored == qtype, name
        if qtype == Q.Q4_1:  # m = -scale * zero is stored in f16: within half an f16 ulp of m
            assert np.abs(w_gguf - w_quant).max() <= 2e-3 * np.abs(w_quant).max() + 1e-6, name
        else:
            np.testing.assert_array_equal(w_gguf, w_quant, err_msg=name)
    # Float tensors keep the writer's default type (f16 2-D, f32 1-D).
    _, tensors = gguf_tensors(path)
    assert tensors["token_embd.weight"].tensor_type == Q.F16
    assert tensors["output_norm.weight"].tensor_type == Q.F32
    assert "carried exactly" in caplog.text or qtype == Q.Q4_1
    assert "re-quantized" not in caplog.text

    # The GGUF backend (int4 planes, bf16 activations) decodes as the PyTorch backend on the
    # quantized checkpoint; compared greedily by full recomputation, 16 tokens.
    prompt = trained[2][0, :8].tolist()
    torch_tokens = reference_greedy(load_backend(qdir), prompt, 16)
    gguf_tokens = reference_greedy(load_backend(path), prompt, 16)
    assert gguf_tokens == torch_tokens


@pytest.mark.parametrize("group_size", [64, -1])
def test_groups_wider_than_a_block_are_exact(trained, tmp_path, group_size):
    """Every block of 32 lies inside one group of 64 (or the per-channel group): each GGUF
    block takes its group's scale, so nothing is re-blocked."""
    qdir, model = quantized_dir(trained, tmp_path, RTNConfig(bits=4, group_size=group_size, sym=True))
    _, weights = carried_weights(model, export_gguf(qdir, tmp_path / "q.gguf"))
    for name, (w_gguf, w_quant, stored) in weights.items():
        assert stored == Q.Q4_0
        np.testing.assert_array_equal(w_gguf, w_quant, err_msg=name)


def test_act_order_is_reblocked_and_reported(trained, tmp_path, caplog):
    """act-order's g_idx mixes groups inside a block of 32: re-quantized, error logged."""
    calibration = torch.randint(0, trained[1].get_vocab_size(), (8, 32), generator=torch.Generator().manual_seed(0))
    config = GPTQConfig(bits=4, group_size=32, sym=True, act_order=True, calib_samples=8, calib_seq_len=32)
    qdir, model = quantized_dir(trained, tmp_path, config, calibration)
    with caplog.at_level(logging.INFO):
        path = export_gguf(qdir, tmp_path / "q.gguf")
    _, weights = carried_weights(model, path)
    reblocked = [r for r in caplog.records if "re-quantized (act-order groups cut blocks of 32)" in r.getMessage()]
    assert reblocked and all(r.levelno == logging.WARNING and "max |w_gguf - w_quant|" in r.getMessage()
                             for r in reblocked)
    for name, (w_gguf, w_quant, stored) in weights.items():
        assert stored == Q.Q4_0
        # Re-quantized to Q4_0's grid: within one Q4_0 step of the block's largest weight.
        assert np.abs(w_gguf - w_quant).max() <= np.abs(w_quant).max() / 4, name


def test_8bit_asym_reblocks_only_blocks_outside_int8(trained, tmp_path, caplog):
    """8-bit asym codes minus zero can leave Q8_0's int8: those blocks alone are re-quantized
    (half a Q8_0 step at most), the rest keep their integers; the error is logged per layer."""
    qdir, model = quantized_dir(trained, tmp_path, RTNConfig(bits=8, group_size=32, sym=False))
    with caplog.at_level(logging.INFO):
        path = export_gguf(qdir, tmp_path / "q.gguf")
    reader, weights = carried_weights(model, path)
    assert int(reader.get_field(names.GENERAL_FILE_TYPE).contents()) == int(LlamaFileType.MOSTLY_Q8_0)
    assert "blocks re-quantized (integers outside Q8_0's -128..127)" in caplog.text
    for name, (w_gguf, w_quant, stored) in weights.items():
        assert stored == Q.Q8_0
        blocks_gguf, blocks_quant = w_gguf.reshape(-1, 32), w_quant.reshape(-1, 32)
        step = np.abs(blocks_quant).max(-1, keepdims=True) / 127
        # half a step, plus the f16 rounding of d (at most 2^-11 of 127 steps)
        assert (np.abs(blocks_gguf - blocks_quant) <= step * (0.5 + 127 / 2048) + 1e-7).all(), name


def test_llama_arch_permutes_carried_rows(tmp_path):
    """--arch llama permutes Q/K rows of the carried blocks; un-permuted they are exact."""
    from fanformer.export.gguf_read import llama_unpermute

    tokenizer = train_tokenizer(TEXTS, 400)
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size(), p=0.0)).eval()
    qdir, model = quantized_dir((model, tokenizer, None), tmp_path, RTNConfig(bits=4, group_size=32, sym=True))
    path = export_gguf(qdir, tmp_path / "q.gguf", arch=names.LLAMA_ARCH)
    _, weights = carried_weights(model, path)
    config = model.config
    for name, (w_gguf, w_quant, stored) in weights.items():
        assert stored == Q.Q4_0
        heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(name.split(".")[2])
        if heads:
            w_gguf = llama_unpermute(torch.from_numpy(w_gguf), heads).numpy()
        np.testing.assert_array_equal(w_gguf, w_quant, err_msg=name)
    assert load_backend(path) is not None


@pytest.mark.parametrize("bits, sym, name", [(4, True, "q4_0"), (4, False, "q4_1"), (8, True, "q8_0")])
def test_default_file_name_says_the_carried_type(trained, tmp_path, bits, sym, name):
    from fanformer.export import default_output

    qdir, _ = quantized_dir(trained, tmp_path, RTNConfig(bits=bits, group_size=32, sym=sym))
    assert default_output(qdir, "gguf") == qdir.with_name(f"{qdir.name}-{name}.gguf")
