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

import shutil
import tempfile
from pathlib import Path

import onnx

from export import onnx_format as names
from fanformer.errors import FANformerError

METHODS = ("int8", "int4", "int8-wo")
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32


def check_options(quantize: str | None, dtype: str, block_size: int | None) -> None:
    """Raise one FANformerError for a combination of flags this module cannot honour."""
    if quantize is None:
        if block_size is not None:
            raise FANformerError("--block-size only applies to --quantize int4 or int8-wo")
        return
    if quantize not in METHODS:
        raise FANformerError(f"unknown ONNX quantization {quantize!r}; choose one of {', '.join(METHODS)}")
    if dtype != "fp32":
        # quantize_dynamic only reads fp32 graphs; MatMulNBits would take fp16, but
        # onnxruntime's CPU kernel for it is fp32 only, so the export could not be validated.
        raise FANformerError(f"--quantize {quantize} needs --dtype fp32 (the quantized weights replace "
                             "the float ones; activations stay fp32)")
    if block_size is not None and quantize == "int8":
        raise FANformerError("--block-size only applies to --quantize int4 or int8-wo "
                             "(int8 quantizes per output channel)")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise FANformerError(f"invalid --block-size {block_size}; choose one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")


def quantize_dynamic_int8(model: Path, out: Path, large: bool) -> None:
    """MatMul weights to int8, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel: one scale per output column, which DynamicQuantizeMatMul's CPU kernel
    # takes at no extra cost and which is measurably closer to fp32 than one scale per
    # matrix. reduce_range (7-bit weights) only helps on x86 without VNNI, where u8 x s8
    # products can saturate; it costs accuracy everywhere else, so it stays off.
    quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                     weight_type=QuantType.QInt8, use_external_data_format=large,
                     extra_options={"MatMulConstBOnly": True})


def quantize_weight_only(model: Path, out: Path, bits: int, block_size: int, large: bool) -> None:
    """MatMul weights to `bits`-bit blocks of `block_size` along the input dimension."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Asymmetric (a zero point per block, 4 or 8 more bits per block) because at 4 bits
    # a symmetric grid wastes a level whenever a block's range is lopsided, and the
    # zero points cost under 1/8 of a bit per weight at block size 32. accuracy_level is
    # left unset: the CPU kernel then computes in float (true weight-only quantization)
    # instead of also quantizing activations to int8.
    quantizer = MatMulNBitsQuantizer(str(model), bits=bits, block_size=block_size, is_symmetric=False,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=large)


def quantize_onnx(folder: Path, method: str, block_size: int | None = None) -> None:
    """Quantize `folder`/model.onnx in place (and its external data file, if any)."""
    model = folder / names.MODEL_FILE
    data = folder / names.DATA_FILE
    large = data.is_file()  # keep weights external when the float model needed it
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        # Write under the final file name so that an external data file is named
        # DATA_FILE and referenced as such from the graph; then move both into place.
        out = Path(scratch) / names.MODEL_FILE
        if method == "int8":
            quantize_dynamic_int8(model, out, large)
        else:
            bits = {"int4": 4, "int8-wo": 8}[method]
            quantize_weight_only(model, out, bits, block_size or DEFAULT_BLOCK_SIZE, large)
        onnx.checker.check_model(str(out))
        data.unlink(missing_ok=True)
        for written in Path(scratch).iterdir():
            shutil.move(written, folder / written.name)
