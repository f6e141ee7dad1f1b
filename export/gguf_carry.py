"""Carrying a quantized checkpoint (`fanformer quantize`, GPTQ v1 packed tensors) into
GGUF without quantizing again: the GPTQ integers and fp16 scales become llama.cpp
blocks byte for byte.

GGUF's q* types are blocks of 32 consecutive input columns of one row (ne[0] = in):

    Q4_0  f16 d, 16 bytes of nibbles (low nibbles elements 0..15, high 16..31)   w = d * (q - 8)
    Q4_1  f16 d, f16 m, 16 bytes of nibbles                                      w = d * q + m
    Q8_0  f16 d, 32 int8                                                         w = d * q

and a GPTQ layer is w = scale[g_idx[i]] * (code - zero). When every run of 32 input
columns lies in one group (g_idx constant over it: any group size that is a multiple
of 32, per channel (-1), or act-order whose permutation happens to keep runs whole),
each GGUF block takes its group's scale and zero:

- sym, bits <= 4 -> Q4_0: d = scale, q = code - zero + 8 (zero = 2^(bits-1), so
  q is in 0..15). Exact: the scale is already fp16.
- asym, bits <= 4 -> Q4_1: d = scale, q = code, m = -scale * zero rounded to f16.
  The only difference is m's f16 rounding (and f32 rounding of d*q + m); the largest
  |w_gguf - w_quant| is logged.
- 8 bits -> Q8_0: d = scale, q = code - zero, exact when it fits int8 (-128..127;
  always for sym, where zero = 128).

Otherwise the weights are dequantized and re-quantized to the same GGUF type by gguf-py's
`gguf.quants`, with the error max |w_gguf - w_quant| logged per layer: the whole layer
when act-order groups cut a run of 32, only the blocks whose integers leave the type's
range otherwise (8-bit asym, where code - zero can leave int8; the rest keep theirs). A layer whose
input width is not a multiple of 32 cannot be blocked at all and is stored dequantized
in F32 (exact: fp16 scale times a small integer fits f32's mantissa).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from gguf import quants

from fanformer.export import gguf_format as names
from fanformer.quant.linear import QuantLinear
from fanformer.quant.packing import unpack

log = logging.getLogger(__name__)

BLOCK = 32
Q = GGMLQuantizationType
FILE_TYPES = {Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
UNBLOCKED_TYPE = Q.F32  # a quantized layer whose rows are not whole blocks of 32, dequantized


def target_type(bits: int, sym: bool) -> GGMLQuantizationType:
    """The GGUF type a quantized checkpoint's layers are carried into."""
    return names.WEIGHT_TYPES[names.carried_type(bits, sym)][0]


@dataclass
class Carried:
    data: np.ndarray  # (out, bytes per row) uint8 for a q* type, (out, in) float32 for F32
    qtype: GGMLQuantizationType
    how: str  # "exact", "m rounded to f16", "re-quantized", "dequantized (rows not blocks of 32)"
    max_abs_error: float  # max |w_gguf - w_quant| (0.0 when exact by construction)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 -> (..., 16) bytes: element j low nibble, j + 16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def blocks_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """d (out, nb) f16-representable, q (out, nb, 32) in 0..15 -> (out, nb * 18) bytes."""
    out = np.concatenate([_f16_bytes(d), _nibbles(q)], axis=-1)
    return out.reshape(q.shape[0], -1)


def blocks_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q)], axis=-1)
    return out.reshape(q.shape[0], -1)


def blocks_q8_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.concatenate([_f16_bytes(d), np.ascontiguousarray(q.astype(np.int8)).view(np.uint8)], axis=-1)
    return out.reshape(q.shape[0], -1)


def max_error(data: np.ndarray, qtype: GGMLQuantizationType, weight: np.ndarray) -> float:
    return float(np.abs(quants.dequantize(data, qtype).reshape(weight.shape) - weight).max())


def carry_layer(layer: QuantLinear, qtype: GGMLQuantizationType) -> Carried:
    """The GGUF data of one quantized linear, rows = output channels (not yet permuted)."""
    codes, scales, zeros, g_idx = unpack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    out_features, in_features = codes.shape
    if in_features % BLOCK:
        return Carried(layer.dequantized_weight().numpy().astype(np.float32), UNBLOCKED_TYPE,
                       "dequantized (rows not blocks of 32)", 0.0)
    weight = layer.dequantized_weight().numpy().astype(np.float32)
    runs = g_idx.long().reshape(-1, BLOCK)
    if bool((runs == runs[:, :1]).all()):
        group = runs[:, 0]
        d = scales[:, group].numpy()  # (out, nb), fp16 values held in fp32
        zero = zeros[:, group].numpy().astype(np.int64)[..., None]
        code = codes.reshape(out_features, -1, BLOCK).numpy().astype(np.int64)
        if qtype == Q.Q4_1:  # bits <= 4: every code is a nibble
            data = blocks_q4_1(d, -(d.astype(np.float64) * zero[..., 0]), code)
            err = max_error(data, qtype, weight)
            return Carried(data, qtype, "exact" if err == 0 else "m rounded to f16", err)
        q, lo, hi, build = ((code - zero + 8, 0, 15, blocks_q4_0) if qtype == Q.Q4_0 else
                            (code - zero, -128, 127, blocks_q8_0))
        fits = (q.min(-1) >= lo) & (q.max(-1) <= hi)  # (out, nb): blocks whose integers fit the type
        data = build(d, np.clip(q, lo, hi))
        if fits.all():
            return Carried(data, qtype, "exact", 0.0)
        # e.g. 8-bit asym: code - zero outside int8 in some blocks; those alone are re-quantized.
        blocks = data.reshape(*fits.shape, -1)
        requantized = quants.quantize(np.ascontiguousarray(weight), qtype).reshape(blocks.shape)
        blocks[~fits] = requantized[~fits]
        return Carried(data, qtype, f"{int((~fits).sum())} of {fits.size} blocks re-quantized (integers outside "
                       f"{qtype.name}'s {lo}..{hi})", max_error(data, qtype, weight))
    data = quants.quantize(np.ascontiguousarray(weight), qtype)
    return Carried(data, qtype, "re-quantized (act-order groups cut blocks of 32)", max_error(data, qtype, weight))


def log_report(report: dict[str, Carried], qconfig: dict) -> None:
    """One line for the layers carried exactly, one for Q4_1's f16 m, one per layer re-quantized."""
    exact = [c for c in report.values() if c.how == "exact"]
    if exact:
        log.info("%d quantized layer(s) carried exactly into %s (the checkpoint's integers and fp16 scales)",
                 len(exact), ", ".join(sorted({c.qtype.name for c in exact})))
    rounded = {name: c for name, c in report.items() if c.how == "m rounded to f16"}
    if rounded:
        worst = max(rounded, key=lambda name: rounded[name].max_abs_error)
        log.info("%d quantized layer(s) carried into Q4_1 from their integers; its m = -scale * zero is stored in "
                 "f16: max |w_gguf - w_quant| = %.3g (%s)", len(rounded), rounded[worst].max_abs_error, worst)
    unpacked = [name for name, c in report.items() if c.qtype == UNBLOCKED_TYPE]
    if unpacked:
        log.warning("%d quantized layer(s) stored dequantized in %s (exact; input width not a multiple of %d): %s",
                    len(unpacked), UNBLOCKED_TYPE.name, BLOCK, ", ".join(unpacked))
    for name, c in report.items():
        if "re-quantized" in c.how:
            log.warning("%s: %s as %s (checkpoint %d-bit, group %s%s), max |w_gguf - w_quant| = %.3g", name, c.how,
                        c.qtype.name, qconfig.get("bits"), qconfig.get("group_size"),
                        ", act-order" if qconfig.get("desc_act") else "", c.max_abs_error)
