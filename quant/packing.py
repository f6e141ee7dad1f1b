"""The GPTQ checkpoint layout: integer codes packed into int32 as AutoGPTQ and GPTQModel
write it (`checkpoint_format: "gptq"`, the v1 layout every GPTQ loader reads).

For a linear layer y = x W^T + b with W (out, in), `bits` in {2, 3, 4, 8} and G groups:

    qweight  (in * bits / 32, out)  int32   codes along the INPUT dimension
    qzeros   (G, out * bits / 32)   int32   zero points minus one, along the OUTPUT dimension
    scales   (G, out)               fp16
    g_idx    (in,)                  int32   group of each input column
    W[o, i] = scales[g_idx[i], o] * (code[i, o] - (zero[g_idx[i], o] + 1))   # stored zero + 1

Packing: the values along the packed dimension are cut into runs of 32; each run is one
little-endian bit stream of 32 * bits bits (value k at bits [k * bits, (k + 1) * bits))
stored as `bits` consecutive int32 words, the low bit of word 0 first. For 2, 4 and 8
bits this is the familiar `word |= v << (bits * k)` with 32 / bits values a word; for 3
bits it is AutoGPTQ's 3-bit packing, where values 10 and 21 of a run straddle two words
(32 values in 3 words). Words are stored as two's-complement int32.

The zero-point convention is v1's "zeros minus one": the stored field holds zero - 1
(AutoGPTQ's `zeros -= 1` before packing; its kernels add the 1 back). GPTQModel's
internal v2 format stores zero itself and converts on load/save; this module writes and
reads v1 only. Zero 0 therefore cannot be stored: `quant.grid` never produces it.

Dimensions must pack whole words: in * bits and out * bits multiples of 32 (so in and out
multiples of 32 for 3 bits, of 8 for 4 bits, of 4 for 8 bits, of 16 for 2 bits).
"""

from __future__ import annotations

import torch

from fanformer.errors import FANformerError
from fanformer.quant.config import BITS

CHECKPOINT_FORMAT = "gptq"  # v1: stored zero = zero - 1


def check_packable(length: int, bits: int, what: str) -> None:
    if bits not in BITS:
        raise FANformerError(f"bits must be one of {BITS}, got {bits}")
    if (length * bits) % 32:
        raise FANformerError(f"{what} of {length} cannot be packed at {bits} bits: the GPTQ layout needs "
                             f"{what} * bits to be a multiple of 32")


def _stream_positions(length: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For value k of the packed dimension: its word index and bit offset in that word."""
    start = torch.arange(length, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (n, m) < 2^bits along dim 0 into int32 words (n * bits / 32, m)."""
    n, m = values.shape
    check_packable(n, bits, "a packed dimension")
    word, offset = _stream_positions(n, bits, values.device)
    shifted = values.to(torch.int64) << offset[:, None]  # (n, m), < 2^39
    words = torch.zeros(n * bits // 32 + 1, m, dtype=torch.int64, device=values.device)
    # Fields never overlap, so adding is OR-ing; a value crossing a word boundary puts
    # its high bits in the next word.
    words.index_add_(0, word, shifted & 0xFFFFFFFF)
    words.index_add_(0, word + 1, shifted >> 32)
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_dim0(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_dim0`: int32 words (n * bits / 32, m) -> codes (n, m) int32."""
    n = words.shape[0] * 32 // bits
    if 32 % bits == 0:  # no value crosses a word: shift int32 words directly (no int64 copies)
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        # An arithmetic shift sign-extends, but the mask keeps only the value's own bits.
        return ((words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)).reshape(n, words.shape[1])
    word, offset = _stream_positions(n, bits, words.device)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    unsigned = torch.cat([unsigned, torch.zeros_like(unsigned[:1])])  # a spare word for the last value
    joined = unsigned[word] | (unsigned[word + 1] << 32)  # (n, m): 64 bits from the value's first word
    return ((joined >> offset[:, None]) & (2**bits - 1)).to(torch.int32)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
         bits: int) -> dict[str, torch.Tensor]:
    """codes (out, in), scales and zeros (out, groups), g_idx (in,) -> the GPTQ tensors.

    Takes the `quant.grid` shapes (rows = output channels) and returns the checkpoint's
    (transposed) layout: qweight, qzeros, scales (fp16), g_idx (int32).
    """
    out_features, in_features = codes.shape
    check_packable(in_features, bits, "an input width")
    check_packable(out_features, bits, "an output width")
    if int(zeros.min()) < 1:
        raise FANformerError("a zero point of 0 cannot be stored in the v1 GPTQ layout (zero - 1 is unsigned)")
    return {"qweight": pack_dim0(codes.t().contiguous(), bits),
            "qzeros": pack_dim0((zeros - 1).contiguous(), bits).t().contiguous(),  # (groups, out * bits / 32)
            "scales": scales.t().to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous()}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
           bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: codes (out, in), scales (out, groups) fp32, zeros (out, groups), g_idx (in,)."""
    codes = unpack_dim0(qweight, bits).t()
    zeros = unpack_dim0(qzeros.t(), bits) + 1  # (out, groups)
    return codes.contiguous(), scales.t().float().contiguous(), zeros.contiguous(), g_idx.to(torch.int32)


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """W^T (in, out) in fp32 straight from the packed tensors (QuantLinear's forward)."""
    codes = unpack_dim0(qweight, bits)  # (in, out)
    zeros = unpack_dim0(qzeros.t(), bits).t() + 1  # (groups, out)
    g = g_idx.long()
    return scales[g].float() * (codes - zeros[g]).float()
