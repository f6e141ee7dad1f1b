"""Post-training quantization of an exported ONNX decoder, done by onnxruntime's own tools.

onnxruntime does the math; this module only picks the options
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html):

- int8: dynamic quantization, `onnxruntime.quantization.quantize_dynamic`. Weights are
  int8 per output channel; activations are quantized per tensor at run time
  (DynamicQuantizeLinear -> MatMulInteger, which onnxruntime fuses at load into
  DynamicQuantizeMatMul).
- int4 / int8-wo: weight-only block quantization to the `com.microsoft.MatMulNBits`
  contrib op, `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`
  (the RTN "DEFAULT" algorithm); activations stay in float.

Only MatMul nodes whose second input is a weight are quantized: every linear layer,
the LM head included. The embedding table (a Gather) and the attention's
activation x activation MatMuls stay in float.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from functools import partial
from pathlib import Path

import onnx

from fanformer.export import onnx_format as names

def quantize_dynamic_int8(model: Path, out: Path, block_size: int, large: bool, accuracy_level: int) -> None:
    """MatMul weights to int8 per output channel; activations quantized at run time.
    (`block_size` and `accuracy_level` are unused: one scale per channel, integer MatMuls.)"""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Measured on a trained 4-layer d=128 model over 6k tokens of held-out text (KL to
    # PyTorch fp32; top-1 agreement): per tensor 0.0014, 95.7%; per channel 0.0013, 96.4%;
    # reduce_range (7-bit weights) 0.0018-0.0023, ~95%. reduce_range only pays on x86
    # without VNNI, where u8 x s8 products can saturate, so it stays off.
    with _quiet_root_logger():  # it warns, on the root logger, that we skip quant_pre_process
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True,
                                        # shape inference stops at the fused graph's contrib ops
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_weight_only(model: Path, out: Path, block_size: int, large: bool, accuracy_level: int,
                         bits: int) -> None:
    """MatMul weights to `bits`-bit blocks of `block_size` along the input dimension,
    with a float scale and a zero point per block (round to nearest); `accuracy_level` is
    MatMulNBits' (4: the CPU kernel quantizes activations to int8 blocks too)."""
    matmul_nbits_quantizer = _import_matmul_nbits_quantizer()
    # Asymmetric (onnxruntime's default): on the model above it measured as good as or
    # slightly better than symmetric (int4/32: KL 0.0279 vs 0.0283; int8/32: 0.00008 vs
    # 0.00011) for 4 or 8 more bits per block.
    quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(
        str(model), bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=large)


QUANTIZERS = {
    "int8": quantize_dynamic_int8,
    "int4": partial(quantize_weight_only, bits=4),
    "int8-wo": partial(quantize_weight_only, bits=8),
}


def quantize_onnx(folder: Path, method: str, block_size: int | None = None, accuracy_level: int | None = None) -> None:
    """Quantize `folder`/model.onnx in place (and its external data file, if any)."""
    model, data = folder / names.MODEL_FILE, folder / names.DATA_FILE
    large = data.is_file()  # keep the weights external when the float model needed it
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        # Write under the final file name, so that the external data file is DATA_FILE
        # and the graph refers to it as such; then move both into place.
        out = Path(scratch) / names.MODEL_FILE
        QUANTIZERS[method](model, out, block_size or names.DEFAULT_BLOCK_SIZE, large, accuracy_level or 0)
        data.unlink(missing_ok=True)
        for written in Path(scratch).iterdir():
            shutil.move(written, folder / written.name)


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _import_matmul_nbits_quantizer():
    """The module calls logging.basicConfig(level=INFO) on import, which in a process
    without logging handlers would turn on INFO logging everywhere; a placeholder
    handler on the root logger makes that call a no-op."""
    root, placeholder = logging.getLogger(), logging.NullHandler()
    root.addHandler(placeholder)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.removeHandler(placeholder)
    return matmul_nbits_quantizer
