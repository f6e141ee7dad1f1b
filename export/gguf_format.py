"""Every GGUF key and tensor name this project writes or reads, in one place.

Keys and tensor names follow llama.cpp (gguf-py's `Keys` and `TENSOR_NAMES`) wherever
llama.cpp has one; FANformer's own parts (the FAN projection, CoLA factors, residual
gates, the V norm, the norm scheme) get project names under the architecture prefix.
Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import re

from gguf import GGMLQuantizationType, LlamaFileType

ARCH = "fanformer"
LLAMA_ARCH = "llama"
FILE_SUFFIX = ".gguf"

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
}
DEFAULT_WEIGHT_TYPE = "f16"
SMALL_TENSOR_TYPE = GGMLQuantizationType.F32
# A 2-D tensor whose row length (ne[0] = in_features) is not a multiple of the quant
# block (32 for every q* type above, so no other q* type fits either) is stored in this
# type, as llama.cpp's convert_hf_to_gguf.py and llama-quantize both do.
FALLBACK_TYPE = GGMLQuantizationType.F16

# --- Tensor names ---------------------------------------------------------------
# (pattern over FANformer state_dict keys, GGUF name template). CoLA layers store their
# two factors as <name>_a (in -> rank) and <name>_b (rank -> out); the FAN projection's
# bias sits on its output factor.
_LINEARS = {
    r"attn\.fan\.proj": "fan",
    r"attn\.q_proj": "attn_q",
    r"attn\.k_proj": "attn_k",
    r"attn\.v_proj": "attn_v",
    r"attn\.o_proj": "attn_output",
    r"ffn\.gate_proj": "ffn_gate",
    r"ffn\.up_proj": "ffn_up",
    r"ffn\.down_proj": "ffn_down",
}
_BLOCK_VECTORS = {
    r"attn_norm\.weight": "attn_norm.weight",
    r"ffn_norm\.weight": "ffn_norm.weight",
    r"attn\.q_norm\.weight": "attn_q_norm.weight",
    r"attn\.k_norm\.weight": "attn_k_norm.weight",
    r"attn\.v_norm\.weight": "attn_v_norm.weight",
    r"attn_gate": "attn_residual_gate.weight",
    r"ffn_gate": "ffn_residual_gate.weight",
}
_TOP_LEVEL = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "lm_head.lora_a.weight": "output_a.weight",
    "lm_head.lora_b.weight": "output_b.weight",
}


def _rules() -> list[tuple[re.Pattern, str]]:
    rules = [(re.compile(re.escape(k) + "$"), v) for k, v in _TOP_LEVEL.items()]
    for pattern, name in _LINEARS.items():
        for suffix, gguf_suffix in ((r"\.weight", ".weight"), (r"\.bias", ".bias"),
                                    (r"\.lora_a\.weight", "_a.weight"), (r"\.lora_b\.weight", "_b.weight"),
                                    (r"\.lora_b\.bias", "_b.bias")):
            rules.append((re.compile(rf"blocks\.(\d+)\.{pattern}{suffix}$"), f"blk.{{}}.{name}{gguf_suffix}"))
    for pattern, name in _BLOCK_VECTORS.items():
        rules.append((re.compile(rf"blocks\.(\d+)\.{pattern}$"), f"blk.{{}}.{name}"))
    return rules


RULES = _rules()


def gguf_tensor_name(state_key: str) -> str:
    """GGUF name of a `FANformer.state_dict()` key, e.g. blocks.3.attn.q_proj.weight -> blk.3.attn_q.weight."""
    for pattern, template in RULES:
        match = pattern.match(state_key)
        if match:
            return template.format(*match.groups())
    raise KeyError(f"no GGUF name for model tensor {state_key!r}")


def tensor_names(state_keys) -> dict[str, str]:
    """{GGUF name: state_dict key} for a model's keys: how a reader maps tensors back."""
    return {gguf_tensor_name(k): k for k in state_keys}
