"""ONNX export of a quantized checkpoint (export/onnx_carry.py): the checkpoint's GPTQ
integers go into MatMulNBits as they are. Decoded independently here, each node's B,
scales and zero points give exactly the checkpoint's dequantized weight; the export's
greedy tokens match the PyTorch backend on the quantized checkpoint; what MatMulNBits
cannot hold is refused with a FANformerError."""

import copy
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from fanformer.export.onnx_export import export_onnx
from fanformer.runtime.validation import compare_logits, validate_onnx
from fanformer.errors import FANformerError
from fanformer.quant.checkpoint import load_quantized_model, quantize_checkpoint
from fanformer.quant import quantize
from fanformer.quant.checkpoint import save_quantized
from fanformer.quant.config import AWQConfig, CalibratedConfig, RTNConfig
from fanformer.quant.linear import QuantLinear
from fanformer.runtime import load_backend, reference_greedy

CONFIGS = {"4-sym": RTNConfig(bits=4, group_size=32, sym=True),
           "4-awq": AWQConfig(bits=4, group_size=32, calib_samples=8, calib_seq_len=32),
           "4-asym": RTNConfig(bits=4, group_size=32, sym=False),
           "8-asym": RTNConfig(bits=8, group_size=32, sym=False)}


@pytest.fixture(scope="module")
def checkpoint(overfit_checkpoint):
    return overfit_checkpoint


@pytest.fixture(scope="module")
def quantized(checkpoint, overfit_tiny):
    out = {}
    for kind, config in CONFIGS.items():
        out[kind] = checkpoint.with_name(f"q{kind}")
        if isinstance(config, CalibratedConfig):  # AWQ folds scales into norms and biases too
            model, tokenizer, _ = overfit_tiny
            model = copy.deepcopy(model)
            calibration = torch.randint(0, tokenizer.get_vocab_size(), (8, 32),
                                        generator=torch.Generator().manual_seed(0))
            save_quantized(out[kind], model, tokenizer, config, quantize(model, config, calibration, progress=False))
        else:
            quantize_checkpoint(checkpoint, config, out[kind], progress=False)
    return out


@pytest.fixture(scope="module")
def exports(quantized):
    """kind -> ONNX folder (float activations: accuracy level 0, so that only float rounding
    differs from PyTorch); export_onnx validates each against the quantized checkpoint."""
    return {kind: export_onnx(path, path.with_name(f"{path.name}-onnx"), accuracy_level=0, validate=validate_onnx)
            for kind, path in quantized.items()}


def decode(node, initializers) -> np.ndarray:
    """W^T (K, N) from a MatMulNBits node, per onnxruntime's contrib-op spec."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    b = numpy_helper.to_array(initializers[node.input[1]])
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)
    n_blocks = (k + block - 1) // block
    assert b.shape == (n, n_blocks, block * bits // 8) and scales.shape == (n, n_blocks)
    if bits == 4:
        flat = b.reshape(n, -1)
        codes = np.stack([flat & 0xF, flat >> 4], axis=-1).reshape(n, -1)[:, :k]
        zp = numpy_helper.to_array(initializers[node.input[3]]).reshape(n, -1)
        zeros = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :n_blocks]
    else:
        codes = b.reshape(n, -1)[:, :k]
        zeros = numpy_helper.to_array(initializers[node.input[3]]).reshape(n, n_blocks)
    group = np.arange(k) // block
    weight = scales[:, group] * (codes.astype(np.float32) - zeros[:, group].astype(np.float32))
    return weight.T  # (K, N)


@pytest.mark.parametrize("kind", CONFIGS)
def test_integers_survive(exports, quantized, kind):
    model = onnx.load(str(exports[kind] / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    layers = {name: m for name, m in load_quantized_model(quantized[kind]).named_modules()
              if isinstance(m, QuantLinear)}
    assert layers
    expected = {name: layer.dequantized_weight().t().numpy() for name, layer in layers.items()}
    matched = set()
    for node in nodes:
        assert node.domain == "com.microsoft"
        got = decode(node, initializers)  # (K, N): one layer, or several packed along N (Q/K/V, gate/up)
        start = 0
        while start < got.shape[1]:
            hits = [name for name, w in expected.items() if w.shape[0] == got.shape[0]
                    and np.array_equal(w, got[:, start:start + w.shape[1]])]
            assert hits, f"{node.name} columns {start}.. decode to no quantized layer's weight"
            matched.update(hits)
            start += expected[hits[0]].shape[1]
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == CONFIGS[kind].bits and attrs["accuracy_level"] == 0
    assert matched == set(layers)
    # No float copy of a quantized weight is left in the file.
    floats = {numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.data_type == 1}
    assert not any(w.tobytes() in floats for w in expected.values())


@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_matches_pytorch_on_quantized(exports, quantized, kind):
    reference, onnx_backend = load_backend(quantized[kind], format="pytorch"), load_backend(exports[kind],
                                                                                             format="onnx")
    prompt = [5, 17, 42, 9]
    assert reference_greedy(onnx_backend, prompt, 16) == reference_greedy(reference, prompt, 16)
    worst, top1 = compare_logits(quantized[kind], exports[kind])
    assert worst < 1e-3 and top1 == 1.0


def test_default_export_quantizes_activations_within_its_tolerance(quantized, tmp_path):
    """Without --accuracy-level, a carried export runs MatMulNBits at level 4 (int8
    activations), recorded in the model, validated against its own, looser tolerance."""
    from fanformer.export import onnx_format as names
    from fanformer.runtime.validation import TOLERANCE

    folder = export_onnx(quantized["4-asym"], tmp_path / "onnx", validate=validate_onnx)
    model = onnx.load(str(folder / "model.onnx"))
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert {p.key: p.value for p in model.metadata_props}[names.META_ACCURACY_LEVEL] == "4"
    worst, top1 = compare_logits(quantized["4-asym"], folder)
    assert 1e-3 < worst <= TOLERANCE["carried-acc4"]  # activations really are rounded
    assert top1 >= 0.9


def rewrite(src, dst, change):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    change(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("config, message", [
    (RTNConfig(bits=2, group_size=32), "2-bit"),
    (RTNConfig(bits=3, group_size=32, keep=("*.fan.proj",)), "3-bit"),
    (RTNConfig(bits=4, group_size=-1), "per-channel group_size -1"),  # ffn_dim 192: not a power of two
])
def test_unsupported_settings(checkpoint, config, message, tmp_path):
    quantize_checkpoint(checkpoint, config, tmp_path / "q", progress=False)
    with pytest.raises(FANformerError, match=message):
        export_onnx(tmp_path / "q", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_act_order_and_options_refused(quantized, tmp_path):
    def permute(state):
        g_idx = state["blocks.0.ffn.down.g_idx"] if "blocks.0.ffn.down.g_idx" in state else \
            next(v for k, v in state.items() if k.endswith(".g_idx"))
        g_idx[[0, 32]] = g_idx[[32, 0]]  # columns 0 and 32 swap groups: an act-order g_idx

    act_order = rewrite(quantized["4-sym"], tmp_path / "act", permute)
    with pytest.raises(FANformerError, match="act-order"):
        export_onnx(act_order, tmp_path / "onnx")
    with pytest.raises(FANformerError, match="already quantized"):
        export_onnx(quantized["4-sym"], tmp_path / "onnx", quantize="int4")
    with pytest.raises(FANformerError, match="fp32"):
        export_onnx(quantized["4-sym"], tmp_path / "onnx", dtype="fp16")
    assert not (tmp_path / "onnx").exists()
