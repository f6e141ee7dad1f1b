"""The ONNX format: every name of the exported decoder (files, inputs, outputs), its
export options, and its registration with the exporter registry.

The names are Hugging Face Optimum's for decoders with a KV cache, which
onnxruntime-genai's `decoder` model type also reads (as printf templates). The writer is
export/onnx_export.py, imported only when an export runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fanformer.config import knob
from fanformer.errors import FANformerError
from fanformer.export import ExportFormat, register

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, used when the model is over 2 GB
GENAI_CONFIG_FILE = "genai_config.json"
OPSET = 21

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

# Dynamic axes.
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE = "batch_size", "sequence_length", "past_sequence_length", \
    "total_sequence_length"


def past_names(n_layers: int) -> list[str]:
    """[past.0.key, past.0.value, past.1.key, ...]: the order of the graph's KV inputs."""
    return [template % i for i in range(n_layers) for template in (PAST_KEY, PAST_VALUE)]


def present_names(n_layers: int) -> list[str]:
    return [template % i for i in range(n_layers) for template in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]


def is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_FILE).is_file()


# --- Export options ---------------------------------------------------------------

DTYPES = ("fp32", "fp16")
QUANTIZE_METHODS = ("int8", "int4", "int8-wo")
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# MatMulNBits on the CPU at level 4 quantizes activations to int8 per block and runs integer
# dot products (onnxruntime-genai's builder's CPU default); 0 computes in the weights' float type.
DEFAULT_ACCURACY_LEVEL = 4
# Model metadata (model.onnx's metadata_props) that records how the folder was exported.
META_GRAPH = "fanformer.graph"  # "fused" or "plain"
META_ACCURACY_LEVEL = "fanformer.accuracy_level"
FUSED, PLAIN = "fused", "plain"
ACCURACY_LEVEL_APPLIES = ("--accuracy-level only applies to --quantize int4 or int8-wo (MatMulNBits) and to "
                          "quantized checkpoints")


@dataclass(frozen=True)
class OnnxOptions:
    dtype: str = knob("fp32", "weights and compute", choices=DTYPES)
    # No choices for these two: __post_init__ checks them together and says what to do.
    quantize: str | None = knob(None, "int8 (dynamic), int4 or int8-wo (weight-only, MatMulNBits); default none")
    block_size: int | None = knob(None, "int4/int8-wo block size: 32 (default), 64 or 128")
    optimize: bool = field(default=True, metadata={
        "help": "onnxruntime's fused contrib ops (GroupQueryAttention with an in-place KV buffer, "
                "SkipSimplifiedLayerNormalization, packed projections); --no-optimize: standard ONNX ops only, "
                "for runtimes other than onnxruntime", "negation": "no_optimize"})
    accuracy_level: int | None = knob(None, "MatMulNBits accuracy level of int4/int8-wo and carried weights: "
                                            "4 (default: int8 activations on the CPU) ... 0 (float activations)")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise FANformerError(f"unsupported ONNX dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise FANformerError(f"invalid --accuracy-level {self.accuracy_level}; choose one of "
                                 f"{', '.join(map(str, ACCURACY_LEVELS))}")
        if self.quantize is None:
            if self.block_size is not None:
                raise FANformerError("--block-size only applies to --quantize int4 or int8-wo")
            return
        if self.quantize not in QUANTIZE_METHODS:
            raise FANformerError(f"unknown ONNX quantization {self.quantize!r}; "
                                 f"choose one of {', '.join(QUANTIZE_METHODS)}")
        if self.quantize == "int8" and self.dtype != "fp32":
            raise FANformerError("--quantize int8 needs --dtype fp32 (onnxruntime's dynamic quantization reads "
                                 "fp32 graphs); for fp16 activations use --quantize int4 or int8-wo")
        if self.accuracy_level is not None and self.quantize == "int8":
            raise FANformerError(ACCURACY_LEVEL_APPLIES)
        if self.block_size is not None and self.quantize == "int8":
            raise FANformerError("--block-size only applies to --quantize int4 or int8-wo "
                                 "(int8 quantizes per output channel)")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise FANformerError(f"invalid --block-size {self.block_size}; choose one of "
                                 f"{', '.join(map(str, BLOCK_SIZES))}")


def default_output(checkpoint: Path, options: OnnxOptions) -> Path:
    """The folder `<checkpoint>-onnx[-<dtype>][-<quantize>][-bs<block size>][-acc<level>][-plain]`
    beside the checkpoint."""
    parts = ["onnx"] + [value for value in (options.dtype, options.quantize) if value not in (None, "fp32")]
    if options.block_size is not None:
        parts.append(f"bs{options.block_size}")
    if options.accuracy_level is not None:
        parts.append(f"acc{options.accuracy_level}")
    if not options.optimize:
        parts.append(PLAIN)
    return checkpoint.with_name(f"{checkpoint.name}-{'-'.join(parts)}")


def write(checkpoint: Path, out: Path, options: OnnxOptions, force: bool, validate) -> Path:
    from fanformer.export.onnx_export import export_onnx

    return export_onnx(checkpoint, out, dtype=options.dtype, quantize=options.quantize,
                       block_size=options.block_size, optimize=options.optimize,
                       accuracy_level=options.accuracy_level, force=force, validate=validate)


register(ExportFormat("onnx", "a folder onnxruntime and onnxruntime-genai run as is", OnnxOptions,
                      default_output, write))
