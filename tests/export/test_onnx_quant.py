"""fp16 and quantized ONNX exports (export/onnx_quant.py): each runs in onnxruntime and
onnxruntime-genai and passes validation, the graphs hold the ops and bit widths asked
for, the weights shrink by the expected factor, and drift against PyTorch stays small."""

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fanformer.export import default_output
from fanformer.export.onnx_export import export_onnx
from fanformer.runtime.validation import TOLERANCE, compare_logits, validate_onnx
from fanformer.export.onnx_quant import quantize_onnx
from fanformer.cli import main
from fanformer.errors import FANformerError
from fanformer.runtime import drift, load_backend, reference_greedy

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20
# (dtype, quantize) of every export kind the tests build once.
KINDS = {"fp32": ("fp32", None), "fp16": ("fp16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4"),
         "int8-wo": ("fp32", "int8-wo")}


@pytest.fixture(scope="module")
def checkpoint(overfit_checkpoint):
    return overfit_checkpoint


@pytest.fixture(scope="module")
def exports(checkpoint):
    """kind -> exported folder; export_onnx validates each (raising above its tolerance)."""
    return {kind: export_onnx(checkpoint, checkpoint.with_name(f"onnx-{kind}"), dtype=dtype, quantize=quantize,
                             validate=validate_onnx)
            for kind, (dtype, quantize) in KINDS.items()}


def graph(folder):
    return onnx.load(str(folder / "model.onnx"))


def weight_matmuls(model):
    """The MatMul nodes whose second input is an initializer: the ones quantization replaces."""
    weights = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def initializer_bytes(model, names):
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name in names)


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_runs_in_onnxruntime_within_tolerance(exports, checkpoint, kind):
    worst, top1 = compare_logits(checkpoint, exports[kind])
    assert worst <= TOLERANCE[kind]
    assert top1 >= {"int4": 0.5}.get(kind, 0.9)  # random tokens on a random model: near-flat logits


def test_fp16_graph_takes_and_returns_fp16(exports):
    model = graph(exports["fp16"])
    kv = [v for v in [*model.graph.input, *model.graph.output] if "key" in v.name or "value" in v.name]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert load_backend(exports["fp16"], format="onnx").info.dtype == "fp16"


@pytest.mark.parametrize("kind, bits", [("int4", 4), ("int8-wo", 8)])
def test_weight_only_graph_uses_matmulnbits(exports, kind, bits):
    float_graph, model = graph(exports["fp32"]), graph(exports[kind])
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # Every weight MatMul (the LM head included) is replaced; the embedding Gather is not.
    assert len(nbits) == len(weight_matmuls(float_graph)) and not weight_matmuls(model)
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and attrs["bits"] == bits and attrs["block_size"] == 32
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    embedding = next(t for t in model.graph.initializer if t.name == gather.input[0])
    assert embedding.data_type == onnx.TensorProto.FLOAT


def test_int8_graph_quantizes_activations_dynamically(exports):
    float_graph, model = graph(exports["fp32"]), graph(exports["int8"])
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] == len(weight_matmuls(float_graph))
    assert not weight_matmuls(model)
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(t.dims) for t in int8) >= sum(
        np.prod(t.dims) for t in float_graph.graph.initializer if t.name in {n.input[1] for n in weight_matmuls(
            float_graph)})


@pytest.mark.parametrize("kind, most", [("int8", 0.30), ("int8-wo", 0.32), ("int4", 0.20)])
def test_quantized_weights_shrink_by_the_expected_factor(exports, kind, most):
    """Bytes behind the quantized MatMuls (weights, scales, zero points) against fp32's:
    int8 1/4 plus a scale per channel; per block of 32, int8-wo (32 + 4 + 1) / 128 and
    int4 (16 + 4 + 0.5) / 128."""
    float_graph, model = graph(exports["fp32"]), graph(exports[kind])
    float_bytes = initializer_bytes(float_graph, {n.input[1] for n in weight_matmuls(float_graph)})
    quantized_ops = {"MatMulNBits", "MatMulInteger", "Mul"}
    used = {i for n in model.graph.node if n.op_type in quantized_ops for i in n.input[1:]}
    new_bytes = initializer_bytes(model, used)
    assert 0.12 < new_bytes / float_bytes < most
    assert (exports[kind] / "model.onnx").stat().st_size < (exports["fp32"] / "model.onnx").stat().st_size


def test_fp16_halves_the_weights(exports):
    # Weights, not file sizes: a tiny graph's file is half node metadata.
    float_graph, model = graph(exports["fp32"]), graph(exports["fp16"])
    ratio = initializer_bytes(model, {t.name for t in model.graph.initializer}) / initializer_bytes(
        float_graph, {t.name for t in float_graph.graph.initializer})
    assert 0.45 < ratio < 0.55


def test_block_size_and_fp16_activations(exports, checkpoint, tmp_path):
    """--block-size reaches MatMulNBits; int4 weights with fp16 activations validate too."""
    for source, block in (("fp32", 64), ("fp16", 32)):
        folder = tmp_path / source
        shutil.copytree(exports[source], folder)
        quantize_onnx(folder, "int4", block)
        sizes = {onnx.helper.get_attribute_value(a) for n in graph(folder).graph.node
                 if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        assert sizes == {block}
        assert compare_logits(checkpoint, folder)[0] <= TOLERANCE["int4"]


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4", "int8-wo"])
def test_drift_against_pytorch(exports, checkpoint, kind):
    reference = load_backend(checkpoint, format="pytorch")
    model = load_backend(exports[kind], format="onnx")
    tokens = np.array(reference.tokenizer.encode("".join(TEXTS[:8])).ids)
    result = drift(model, reference, tokens, ctx=64)
    assert 0 < result.kl_mean < {"fp16": 1e-4, "int4": 0.05}.get(kind, 5e-3)
    assert result.top1_agreement >= {"int4": 0.8}.get(kind, 0.95)


@pytest.mark.parametrize("kind", ["fp16", "int8", "int4"])
def test_genai_greedy_matches_onnxruntime(exports, checkpoint, kind):
    pytest.importorskip("onnxruntime_genai")
    from fanformer.runtime.genai import GenaiSession

    prompt = load_backend(checkpoint, format="pytorch").tokenizer.encode(TEXTS[0]).ids
    expected = reference_greedy(load_backend(exports[kind], format="onnx"), prompt, 8)
    assert GenaiSession(exports[kind]).generate(prompt, 8) == expected


@pytest.mark.parametrize("options, message", [
    (dict(quantize="int3"), "unknown ONNX quantization"),
    (dict(quantize="int8", dtype="fp16"), "needs --dtype fp32"),
    (dict(quantize="int4", block_size=48), "invalid --block-size"),
    (dict(quantize="int8", block_size=32), "only applies"),
    (dict(block_size=32), "only applies"),
])
def test_bad_options_fail_before_exporting(checkpoint, tmp_path, options, message):
    with pytest.raises(FANformerError, match=message):
        export_onnx(checkpoint, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_cli_flags_and_default_names(checkpoint, capsys):
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "int5"]) == 2
    assert "unknown ONNX quantization" in capsys.readouterr().err
    assert default_output("/m/qs", "onnx", dtype="fp32", quantize="int4").name == "qs-onnx-int4"
    assert default_output("/m/qs", "onnx", dtype="fp16", quantize="int8-wo", block_size=64).name \
        == "qs-onnx-fp16-int8-wo-bs64"
    assert default_output("/m/qs", "onnx", dtype="fp16", quantize=None).name == "qs-onnx-fp16"
