"""K-quants and 4-bit i-quants for GGUF: llama.cpp's per-tensor type mixtures, quantized by
ggml's own code.

ggml's `ggml_quantize_chunk` (through ggml-python) is the maintained implementation of
every block type, with or without an importance matrix; gguf-py can only dequantize the
K-quants. Given the same float32 rows, it writes the bytes llama.cpp's `llama-quantize`
writes. The mixtures (which tensors of a Q4_K_M file get Q6_K, ...) follow llama.cpp's
`llama_tensor_get_type` (src/llama-quant.cpp) for a dense model; FANformer's own tensors
(the FAN projection, CoLA factors) have no rule there and take the file's base type, as
llama.cpp does with any tensor it has no category for. A tensor whose rows are not a
multiple of the type's block falls back as llama.cpp's `tensor_type_fallback` does.

The legacy types (q4_0 ... q8_0) follow llama.cpp's mixture too (the LM head in Q6_K, as
`llama-quantize FILE OUT Q4_0` writes it; `--pure` keeps one type) and are quantized here
when an importance matrix is given (ggml then minimises the imatrix-weighted error);
without one, gguf-py's reference quantizer writes the same bytes as ggml's.

The mixtures key on llama.cpp's tensor names, so FANformer's GGUF tensor names live here
too (`gguf_tensor_name`; export/gguf_format.py re-exports them): the GGUF export and the
K-grid GPTQ checkpoint (quant/gptq_k.py) both place tensors by them.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from fanformer.errors import FANformerError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Mixture:
    """One --type: its base tensor type and general.file_type."""

    base: GGMLQuantizationType
    file_type: LlamaFileType


MIXTURES = {
    "q2_k": Mixture(Q.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "q3_k_s": Mixture(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": Mixture(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": Mixture(Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "q4_k_s": Mixture(Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": Mixture(Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": Mixture(Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": Mixture(Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": Mixture(Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "iq4_nl": Mixture(Q.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "iq4_xs": Mixture(Q.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}

# llama.cpp's tensor_type_fallback: a type whose block does not divide the row length.
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}
_LAYER = re.compile(r"blk\.(\d+)\.")
# Types gguf-py quantizes itself, byte for byte as ggml's reference quantizer (without an imatrix).
REFERENCE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)


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


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixtures: the first and
    last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mixture_type(name: str, kind: str, n_layers: int, n_gqa: int, tied: bool, imatrix: bool,
                 pure: bool = False) -> GGMLQuantizationType:
    """The tensor type llama.cpp's --type `kind` gives the 2-D tensor `name` (before the
    row-length fallback). `kind` is a MIXTURES key or a legacy type (q4_0, q5_0, ...), whose
    rules are the LM head's Q6_K and imatrix's guard on the first eighth of ffn_down. `pure`:
    `kind`'s base type everywhere, as llama-quantize --pure."""
    legacy = kind not in MIXTURES
    base = Q[kind.upper()] if legacy else MIXTURES[kind].base
    if pure:
        return base
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return base if base == Q.Q8_0 else Q.Q6_K  # legacy types too; Q8_0 stays
    if legacy:
        if name.endswith("ffn_down.weight") and imatrix and layer < n_layers // 8 and base in (Q.Q4_0, Q.Q5_0):
            return Q.Q4_1 if base == Q.Q4_0 else Q.Q5_1  # "guard against craziness in the first ffn_down"
        return base
    if name.endswith("attn_v.weight"):
        rules = {
            "q2_k": Q.Q4_K if n_gqa >= 4 else Q.Q3_K,
            "q3_k_m": Q.Q5_K if layer < 2 else Q.Q4_K,
            "q3_k_l": Q.Q5_K,
            "iq4_nl": Q.Q5_K if n_gqa >= 4 else base,
            "iq4_xs": Q.Q5_K if n_gqa >= 4 else base,
            "q4_k_m": Q.Q6_K if use_more_bits(layer, n_layers) else base,
            "q5_k_m": Q.Q6_K if use_more_bits(layer, n_layers) else base,
            "q4_k_s": Q.Q5_K if layer < 4 else base,
        }
        return rules.get(kind, base)
    if name.endswith("ffn_down.weight"):
        rules = {
            "q2_k": Q.Q3_K,
            "q3_k_m": Q.Q5_K if layer < n_layers // 16 else Q.Q4_K,
            "q3_k_l": Q.Q5_K,
            "q4_k_m": Q.Q6_K if use_more_bits(layer, n_layers) else base,
            "iq4_nl": Q.Q5_K if layer < n_layers // 8 and not imatrix else base,
            "iq4_xs": Q.Q5_K if layer < n_layers // 8 and not imatrix else base,
            "q5_k_m": Q.Q6_K if use_more_bits(layer, n_layers) else base,
            "q4_k_s": Q.Q5_K if layer < n_layers // 8 else base,
        }
        return rules.get(kind, base)
    if name.endswith("attn_output.weight"):
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(kind, base)
    return base


def fallback_type(qtype: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """`qtype`, or llama.cpp's fallback when its block does not divide the rows (F16 last)."""
    if row_length % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, Q.F16)
    return qtype if row_length % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """(n_rows, row_length) float32 -> (n_rows, row bytes) uint8 in `qtype`, by ggml's
    `ggml_quantize_chunk`; `importance` (row_length,) weighs each column's squared error."""
    import ggml

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, row_length = rows.shape
    gtype = int(qtype)
    if row_length % GGML_QUANT_SIZES[qtype][0]:
        raise FANformerError(f"cannot quantize rows of {row_length} to {qtype.name}: its block is "
                             f"{GGML_QUANT_SIZES[qtype][0]}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (row_length,):
            raise FANformerError(f"importance matrix entry of {importance.shape[0]} columns for rows of {row_length}")
    ggml.ggml_quantize_init(gtype)  # the i-quants' grids; a no-op for the others
    out = np.zeros((n_rows, ggml.ggml_row_size(gtype, row_length)), dtype=np.uint8)
    weights = None if importance is None else importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = ggml.ggml_quantize_chunk(gtype, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       out.ctypes.data_as(ctypes.c_void_p), 0, n_rows, row_length, weights)
    if written != out.nbytes:
        raise FANformerError(f"ggml wrote {written} bytes of {qtype.name} where {out.nbytes} were expected")
    return out
