"""The GGUF format: every key and tensor name this project writes or reads, the export
options, file detection, and the registration with the exporter registry (the writer is
export/gguf_export.py, the reader runtime/gguf_backend.py).

Keys and tensor names follow llama.cpp (gguf-py's `Keys` and `TENSOR_NAMES`) wherever
llama.cpp has one; FANformer's own parts (the FAN projection, CoLA factors, residual
gates, the V norm, the norm scheme) get project names under the architecture prefix.
Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from fanformer.config import knob
from fanformer.errors import FANformerError
from fanformer.export import ExportFormat, register
from fanformer.quant import kquants

ARCH = "fanformer"
LLAMA_ARCH = "llama"
FILE_SUFFIX = ".gguf"
MAGIC = b"GGUF"

# --- Hyperparameters (format with arch=...) -----------------------------------------
# llama.cpp's names.
CONTEXT_LENGTH = "{arch}.context_length"
EMBEDDING_LENGTH = "{arch}.embedding_length"
BLOCK_COUNT = "{arch}.block_count"
FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
HEAD_COUNT = "{arch}.attention.head_count"
HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
KEY_LENGTH = "{arch}.attention.key_length"
VALUE_LENGTH = "{arch}.attention.value_length"
RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
ROPE_FREQ_BASE = "{arch}.rope.freq_base"
ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
VOCAB_SIZE = "{arch}.vocab_size"
# The project's own.
FAN_PERIODIC_RATIO = "{arch}.fan.periodic_ratio"  # p
FAN_PERIODIC_LENGTH = "{arch}.fan.periodic_length"  # d_p = floor(d * p), stored so readers need no float maths
FAN_ACTIVATION = "{arch}.fan.activation"  # "identity" | "gelu"
NORM_SCHEME = "{arch}.norm_scheme"  # "pre" | "hybrid"
COLA_RANK_RATIO = "{arch}.cola.rank_ratio"  # 0 = off
COLA_LM_HEAD = "{arch}.cola.lm_head"
GATED_RESIDUAL = "{arch}.gated_residual"
TIE_EMBEDDINGS = "{arch}.tie_embeddings"

# Keys a FANformer file must have (a llama file needs the llama.cpp ones only).
REQUIRED_KEYS = (CONTEXT_LENGTH, EMBEDDING_LENGTH, BLOCK_COUNT, FEED_FORWARD_LENGTH, HEAD_COUNT, HEAD_COUNT_KV,
                 KEY_LENGTH, RMS_EPS, ROPE_FREQ_BASE, VOCAB_SIZE)
PROJECT_KEYS = (FAN_PERIODIC_RATIO, FAN_PERIODIC_LENGTH, FAN_ACTIVATION, NORM_SCHEME, COLA_RANK_RATIO,
                COLA_LM_HEAD, GATED_RESIDUAL, TIE_EMBEDDINGS)

# --- General and tokenizer keys (llama.cpp's) -------------------------------------
GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_NAME = "general.name"
GENERAL_FILE_TYPE = "general.file_type"
GENERAL_QUANTIZATION_VERSION = "general.quantization_version"
GENERAL_ALIGNMENT = "general.alignment"
TOKENIZER_MODEL = "tokenizer.ggml.model"  # "gpt2": byte-level BPE
TOKENIZER_PRE = "tokenizer.ggml.pre"  # pre-tokenizer name
TOKENIZER_TOKENS = "tokenizer.ggml.tokens"
TOKENIZER_TOKEN_TYPE = "tokenizer.ggml.token_type"
TOKENIZER_MERGES = "tokenizer.ggml.merges"
TOKENIZER_BOS_ID = "tokenizer.ggml.bos_token_id"
TOKENIZER_EOS_ID = "tokenizer.ggml.eos_token_id"
TOKENIZER_PAD_ID = "tokenizer.ggml.padding_token_id"
TOKENIZER_ADD_BOS = "tokenizer.ggml.add_bos_token"
TOKENIZER_ADD_EOS = "tokenizer.ggml.add_eos_token"
TOKENIZER_MODEL_GPT2 = "gpt2"
TOKENIZER_PRE_GPT2 = "gpt-2"  # the GPT-2 split regex of tokenizers' ByteLevel pre-tokenizer

# Hyperparameters of a plain `llama` file (export --arch llama): llama.cpp's names only.
LLAMA_KEYS = (CONTEXT_LENGTH, EMBEDDING_LENGTH, BLOCK_COUNT, FEED_FORWARD_LENGTH, HEAD_COUNT, HEAD_COUNT_KV,
              KEY_LENGTH, VALUE_LENGTH, RMS_EPS, ROPE_FREQ_BASE, ROPE_DIMENSION_COUNT, VOCAB_SIZE)
# Everything a FANformer file holds under its architecture prefix.
FANFORMER_KEYS = LLAMA_KEYS + PROJECT_KEYS

# --- Weight types (export --type) -------------------------------------------------
# name -> (tensor type of the 2-D weights, general.file_type). Every 1-D tensor (norms,
# biases, residual gates) stays F32 whatever the type, as llama.cpp's converter does.
WEIGHT_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    # llama.cpp's K-quant and 4-bit i-quant mixtures: the base type, some tensors higher
    # (quant/kquants.py).
    "q2_k": (GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "q3_k_s": (GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": (GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": (GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "q4_k_s": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": (GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "iq4_nl": (GGMLQuantizationType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "iq4_xs": (GGMLQuantizationType.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}
LEGACY_TYPES = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")  # one type, but the LM head Q6_K unless q8_0 (llama.cpp)
# What --output-tensor-type / --token-embedding-type take: single tensor types, llama-quantize's names.
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_xs",
                "iq4_nl", "q3_k", "q2_k")
FLOAT_TYPES = ("f32", "f16", "bf16")  # nothing to quantize: --imatrix and --gptq do not apply
GPTQ_CALIB_SAMPLES = 128  # --gptq's calibration windows, GPTQConfig's default
IMATRIX_CTX = 512  # tokens per window of an importance matrix (llama-imatrix's default -c), capped at the context
DEFAULT_WEIGHT_TYPE = "f16"
SMALL_TENSOR_TYPE = GGMLQuantizationType.F32
FLOAT_GGML_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

# Tensor names: llama.cpp's, which its quantization mixtures key on (quant/kquants.py).
gguf_tensor_name, tensor_names = kquants.gguf_tensor_name, kquants.tensor_names


def is_gguf_file(path: Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    if path.suffix == FILE_SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def carried_type(bits: int, sym: bool) -> str:
    """The --type a GPTQ-layout checkpoint's layers are carried into (export/gguf_carry.py)."""
    return "q8_0" if bits == 8 else ("q4_0" if sym else "q4_1")


def carried_checkpoint_type(quantization: dict | None, type: str | None) -> str | None:
    """The --type a quantized checkpoint exports as given --type `type` (None: not given), or
    None when the checkpoint is float or its weights are re-quantized into `type`: a K-quant
    --type re-quantizes GPTQ-layout integers; a K-grid checkpoint (quant/gptq_k.py) is
    carried into its own mixture unless another quantized type is asked for."""
    from fanformer.quant.config import GGML_CHECKPOINT_FORMAT

    if quantization is None:
        return None
    if quantization.get("checkpoint_format") == GGML_CHECKPOINT_FORMAT:
        grid = quantization.get("grid")
        return grid if type is None or type in FLOAT_TYPES or type == grid else None
    if type in kquants.MIXTURES:
        return None
    return carried_type(quantization.get("bits"), bool(quantization.get("sym", True)))


# --- Export options ---------------------------------------------------------------

@dataclass(frozen=True)
class GGUFOptions:
    type: str | None = knob(None, f"type of the 2-D weights (default {DEFAULT_WEIGHT_TYPE}; 1-D tensors stay f32)",
                            choices=tuple(WEIGHT_TYPES))
    arch: str = knob(ARCH, "fanformer (every option) or llama (llama.cpp's own; p=0 pre-norm models only)",
                     choices=(ARCH, LLAMA_ARCH))
    imatrix: str | None = knob(None, "importance matrix (llama.cpp's imatrix GGUF, from `fanformer imatrix` or "
                                     "llama-imatrix) weighting the rounding error of q* and k-quant types")
    gptq: bool = knob(False, "GPTQ on Q4_K's grid (q4_k_s/q4_k_m; other types: Hessian-weighted), calibrated on "
                             "--calib-data; the float checkpoint only")
    calib_data: tuple[str, ...] = knob((), "corpus files/folders/globs whose TRAINING split calibrates --gptq "
                                           "(default: the Python standard library), or, without --gptq, gives an "
                                           "importance matrix measured here (repeatable)")
    calib_samples: int = knob(GPTQ_CALIB_SAMPLES, "calibration windows of --gptq / --calib-data")
    output_tensor_type: str | None = knob(None, "type of output.weight (the LM head), as llama-quantize's "
                                                "--output-tensor-type; default: what --type's mixture says",
                                          choices=TENSOR_TYPES)
    token_embedding_type: str | None = knob(None, "type of token_embd.weight, as llama-quantize's "
                                                  "--token-embedding-type; default: what --type's mixture says",
                                            choices=TENSOR_TYPES)
    pure: bool = knob(False, "every 2-D weight in --type's base type, as llama-quantize --pure (default: "
                             "llama.cpp's mixture for the type, e.g. the LM head in q6_k)")

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in WEIGHT_TYPES:
            raise FANformerError(f"unsupported GGUF type {self.type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
        if self.arch not in (ARCH, LLAMA_ARCH):
            raise FANformerError(f"unsupported GGUF architecture {self.arch!r}; choose one of {ARCH}, {LLAMA_ARCH}")
        if self.gptq and self.imatrix is not None:
            raise FANformerError("--gptq measures the layers' full Hessians itself; drop --imatrix")
        self._only_quantized("--gptq", self.gptq)
        if self.calib_data and self.imatrix is not None:
            raise FANformerError("--calib-data measures an importance matrix, --imatrix reads one: give one of them")
        if not self.calib_data and not self.gptq and self.calib_samples != GPTQ_CALIB_SAMPLES:
            raise FANformerError("--calib-samples only applies with --calib-data or --gptq")
        self._only_quantized("--calib-data (an importance matrix)", self.calib_data and not self.gptq)
        if not isinstance(self.calib_samples, int) or self.calib_samples < 1:
            raise FANformerError(f"--calib-samples must be a positive integer, got {self.calib_samples!r}")
        for flag, value in (("--output-tensor-type", self.output_tensor_type),
                            ("--token-embedding-type", self.token_embedding_type)):
            if value is not None and value not in TENSOR_TYPES:
                raise FANformerError(f"unsupported {flag} {value!r}; choose one of {', '.join(TENSOR_TYPES)}")
        self._only_quantized("--pure", self.pure)
        self._only_quantized("--imatrix", self.imatrix is not None)

    def _only_quantized(self, flag: str, given) -> None:
        """Refuse `flag`, when `given`, for a float --type: it has nothing to quantize."""
        if given and (self.type or DEFAULT_WEIGHT_TYPE) in FLOAT_TYPES:
            raise FANformerError(f"{flag} only applies to quantized types, not --type {self.type or DEFAULT_WEIGHT_TYPE}")


def default_output(checkpoint: Path, options: GGUFOptions) -> Path:
    """The file `<checkpoint>[-llama]-<type>[-imatrix][-gptq][-pure][-output-T][-embd-T].gguf`
    beside the checkpoint; a quantized checkpoint's type is the one it is carried into."""
    from fanformer.checkpoint import read_quantization_config

    quantization = read_quantization_config(checkpoint)
    carried = carried_checkpoint_type(quantization, options.type)
    parts = [checkpoint.name] + (["llama"] if options.arch == LLAMA_ARCH else [])
    parts.append(carried or options.type or DEFAULT_WEIGHT_TYPE)
    if options.imatrix is not None or (options.calib_data and not options.gptq):
        parts.append("imatrix")
    if options.gptq:
        parts.append("gptq")
    if options.pure:
        parts.append("pure")
    for label, chosen in (("output", options.output_tensor_type), ("embd", options.token_embedding_type)):
        if chosen is not None:  # files made with other tensor types do not share a name
            parts.append(f"{label}-{chosen}")
    return checkpoint.with_name("-".join(parts) + FILE_SUFFIX)


def write(checkpoint: Path, out: Path, options: GGUFOptions, force: bool, validate) -> Path:
    from fanformer.export.gguf_export import export_gguf

    # No check runs here (`validate` is not called): the GGUF tests and the drift table run the file.
    return export_gguf(checkpoint, out, type=options.type, arch=options.arch,
                       imatrix=options.imatrix, gptq=options.gptq, calib_data=list(options.calib_data) or None,
                       calib_samples=options.calib_samples, output_tensor_type=options.output_tensor_type,
                       token_embedding_type=options.token_embedding_type, pure=options.pure, force=force)


register(ExportFormat("gguf", "one file for llama.cpp-style runtimes", GGUFOptions, default_output, write))
