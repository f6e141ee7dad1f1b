"""Layers over a GGUF file's own tensors, for the GGUF backend: the block layouts
dequantized (pure functions, ggml-quants.c's layouts in torch), q* blocks rewritten as
4-bit planes for torch's int4 kernel, and the linear/embedding modules that multiply on
the file's types.

How weights are held (nothing is kept in fp32 unless the file is fp32) and multiplied:

- F32 2-D weights are torch views of the memory map (no copy), multiplied as the PyTorch
  backend does (`F.linear`).
- F16 weights are packed once into fbgemm's fp16 GEMM layout (the same two bytes a
  weight; `quantized.linear_prepack_fp16`) and multiplied by `quantized.linear_dynamic_fp16`,
  which widens them to fp32 in registers: fp32 activations and accumulation, so the result
  is the fp32 product of the file's weights up to summation order, with no casts around
  the call. (`F.linear` on fp16 tensors runs a generic oneDNN path that was slower than
  fp32 here, and rounds the activations to fp16.)
- BF16 weights go the same way, converted to fp16 at load: bf16 has 8 significant bits
  to fp16's 11, so every weight with 2^-17 <= |w| <= 65504 converts exactly, and a
  smaller one moves by at most 2^-25 (fp16's subnormal step), far below bf16's own
  rounding of any weight that matters. A tensor with |w| > 65504 keeps bf16, reordered
  once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) for
  `mkldnn._linear_pointwise` on bf16 activations; that path is exact in the weights but
  measured slower than fp32 on a small model (each call costs about as much as fbgemm's,
  plus two casts), hence fp16 first. Both hold two bytes a weight.
- Without fbgemm / oneDNN bf16 (non-x86 builds), 16-bit weights are views of the memory
  map multiplied by `F.linear` in their own dtype.
- Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights (block layouts of ggml-quants.c, as in
  gguf.quants) are written as a sum of 4-bit planes with a scale and a zero per block
  of 32 (`int4_planes`) and packed once at load for torch's CPU int4 group-wise kernel
  (`aten._weight_int4pack_mm_for_cpu`, value = (q - 8) * scale + zero): one plane for
  4-bit types, two for 5- and 8-bit ones, concatenated along the input so one kernel
  call sums them. The packed planes take the same bytes as the blocks (8-bit: +17 %
  for the second plane's scales). The kernel runs on bf16 activations and bf16
  scales (its fp32 path is a slow reference loop); every other part of the model stays
  fp32. torch has no CPU kernel for int8 with a scale per block of 32
  (`aten._weight_int8pack_mm` takes one scale per row), hence the two planes for Q8_0.
- K-quant and 4-bit i-quant weights (Q2_K ... Q6_K, IQ4_NL, IQ4_XS) have no fast path in
  this engine yet: gguf-py dequantizes them once at load and they run as 16-bit or fp32
  weights, as above (the ggml engine runs them in their own blocks).
- The token embedding keeps its raw blocks (a view of the memory map) and only the
  rows a step looks up are dequantized, with the pure `dequantize_*` functions below
  (gguf-py's for the K- and i-quants).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QUANT_TYPES = (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1)
# Read, but dequantized by gguf-py at load (no fast path here yet).
DEQUANTIZED_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)
TORCH_FLOAT = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
INT4_GROUP = 32  # every supported q* type has blocks of 32, one kernel group each
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # x86 builds of torch
HAS_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# The kernels as resolved overloads: calling an op packet (torch.ops.ns.op) re-resolves it
# on every call, which is a measurable share of a small model's decode step. The fp16 op
# takes a TorchBind object, whose overload wrapper also walks the arguments in Python
# looking for fake objects (only torch.compile makes those); its bound C++ function `_op`
# skips that, 3% of `small`'s decode step. Torch builds without `_op` use the wrapper.
LINEAR_FP16 = torch.ops.quantized.linear_dynamic_fp16.default if HAS_FBGEMM else None
LINEAR_FP16 = getattr(LINEAR_FP16, "_op", LINEAR_FP16)
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default


# --- Block layouts: pure dequantization (ggml-quants.c's layouts, in torch) ----------
# Each takes uint8 blocks (..., type_size) and returns float32 values (..., 32).

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte `start` of each block, as float32 (..., 1)."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) packed bytes -> (..., 32) values 0..15: low nibbles are elements 0-15, high 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32) bits, bit j for element j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., :, None] >> shifts) & 1).flatten(-2)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes: d (fp16), 32 x int8 q. value = d * q."""
    return _f16(blocks, 0) * blocks[..., 2:].view(torch.int8).float()


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes: d (fp16), 16 bytes of nibbles q. value = d * (q - 8)."""
    return _f16(blocks, 0) * (_nibbles(blocks[..., 2:]).float() - 8)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes: d, m (fp16), 16 bytes of nibbles q. value = d * q + m."""
    return _f16(blocks, 0) * _nibbles(blocks[..., 4:]).float() + _f16(blocks, 2)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 bytes: d (fp16), qh (32 fifth bits), 16 bytes of nibbles. value = d * (q - 16)."""
    q = _nibbles(blocks[..., 6:]) | (_high_bits(blocks[..., 2:6]) << 4)
    return _f16(blocks, 0) * (q.float() - 16)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24 bytes: d, m (fp16), qh (32 fifth bits), 16 bytes of nibbles. value = d * q + m."""
    q = _nibbles(blocks[..., 8:]) | (_high_bits(blocks[..., 4:8]) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


DEQUANTIZE = {Q.Q8_0: dequantize_q8_0, Q.Q4_0: dequantize_q4_0, Q.Q4_1: dequantize_q4_1,
              Q.Q5_0: dequantize_q5_0, Q.Q5_1: dequantize_q5_1}


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """A tensor as stored (rows, row bytes) for q* types, (rows, n) for float types -> float32 (rows, n)."""
    if qtype in FLOAT_TYPES:
        return data.view(TORCH_FLOAT[qtype]).float()
    if qtype in DEQUANTIZED_TYPES:
        return torch.from_numpy(quants.dequantize(data.numpy(), qtype))
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.unflatten(-1, (-1, type_size))  # (rows, n / 32, type_size)
    return DEQUANTIZE[qtype](blocks).flatten(-2)


# --- 4-bit planes: every q* type in the int4 kernel's (q - 8) * scale + zero ----------

def int4_planes(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> list[tuple[torch.Tensor, ...]]:
    """[(q (..., 32) uint8 in 0..15, scale (..., 1), zero (..., 1))] such that the sum over
    planes of (q - 8) * scale + zero is the block's value (exact in float32).

    4-bit types are one plane. A 5-bit q = l + 16 h and an 8-bit q + 128 = l + 16 h are
    two: the low nibble l with scale d, and the high part h with scale 16 d.
    """
    d = _f16(blocks, 0)
    zero = torch.zeros_like(d)
    if qtype == Q.Q4_0:  # d (q - 8)
        return [(_nibbles(blocks[..., 2:]), d, zero)]
    if qtype == Q.Q4_1:  # d q + m = d (q - 8) + (m + 8 d)
        return [(_nibbles(blocks[..., 4:]), d, _f16(blocks, 2) + 8 * d)]
    if qtype == Q.Q5_0:  # d (l + 16 h - 16) = d (l - 8) + 16 d ((h + 8) - 8) - 8 d
        h = _high_bits(blocks[..., 2:6])
        return [(_nibbles(blocks[..., 6:]), d, zero), (h + 8, 16 * d, -8 * d)]
    if qtype == Q.Q5_1:  # d (l + 16 h) + m = d (l - 8) + 16 d ((h + 8) - 8) + (m + 8 d)
        h = _high_bits(blocks[..., 4:8])
        return [(_nibbles(blocks[..., 8:]), d, zero), (h + 8, 16 * d, _f16(blocks, 2) + 8 * d)]
    if qtype == Q.Q8_0:  # d q, q + 128 = l + 16 h: d (l - 8) + 16 d (h - 8) + 8 d
        u = (blocks[..., 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return [(u & 0x0F, d, 8 * d), (u >> 4, 16 * d, zero)]
    raise ValueError(f"no 4-bit planes for {qtype.name}")


# --- Layers over GGUF tensors ----------------------------------------------------------

class DenseLinear(nn.Module):
    """y = x W^T + b with W kept in the file's float type (a view of the memory map); a
    16-bit W multiplies 16-bit activations, the result comes back as float32. F32 files
    use it, and 16-bit ones where torch lacks the kernels below."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)  # (out, in)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.to(self.weight.dtype), self.weight).float()
        return y if self.bias is None else y + self.bias


class Fp16Linear(nn.Module):
    """y = x W^T + b with an F16 W in fbgemm's packed fp16 layout: fp32 in, fp32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)  # an opaque fbgemm object

    def held_bytes(self) -> int:
        """What the packed weight holds: 2 bytes a weight, as in the file (fbgemm pads to its
        block sizes; 0.6 % more resident memory for a 8192 x 2048 weight, measured)."""
        return 2 * self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LINEAR_FP16(x, self.packed)


class Bf16Linear(nn.Module):
    """y = x W^T + b with a BF16 W in oneDNN's blocked layout; bf16 activations, fp32 result."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # A batch size of 1 lays the weight out for decode; prefill's bigger batches still run on it.
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, None, "none", [], "").float()
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T + b with W a q* tensor as packed 4-bit planes (see `int4_planes`).

    The planes are concatenated along the input (W_cat = [P_1 | P_2], x_cat = [x | x]),
    so a two-plane type is still one kernel call; rows are padded to a multiple of 16,
    as the kernel requires.
    """

    PACK_ROWS = 4096  # rows unpacked at a time while packing (a multiple of the kernel's 64-row tiles)

    def __init__(self, blocks: torch.Tensor, qtype: GGMLQuantizationType, bias: torch.Tensor | None):
        super().__init__()
        out_features, n_blocks, _ = blocks.shape  # (out, in / 32, type_size)
        self.out_features, self.in_features = out_features, n_blocks * INT4_GROUP
        packed, scales_zeros = [], []
        for start in range(0, out_features, self.PACK_ROWS):  # bounds the int32 copy the packer needs
            planes = int4_planes(blocks[start:start + self.PACK_ROWS], qtype)
            self.n_planes = len(planes)
            q = torch.cat([p[0].flatten(1) for p in planes], dim=1)  # (rows, planes * in)
            sz = torch.cat([torch.cat([scale, zero], dim=-1) for _, scale, zero in planes], dim=1)
            padded = -q.shape[0] % 16  # only the last chunk can be short
            q = F.pad(q, (0, 0, 0, padded)).to(torch.int32)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            scales_zeros.append(F.pad(sz, (0, 0, 0, 0, 0, padded)).to(torch.bfloat16))  # (rows', planes * in / 32, 2)
        self.register_buffer("packed", torch.cat(packed), persistent=False)
        self.register_buffer("scales_zeros", torch.cat(scales_zeros).transpose(0, 1).contiguous(),
                             persistent=False)  # (groups, out', 2): the kernel's layout
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
        if self.n_planes > 1:
            x = torch.cat([x] * self.n_planes, dim=1)  # (M, planes * in); a fifth of repeat's cost here
        y = INT4_MM(x, self.packed, INT4_GROUP, self.scales_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]  # (M, out): drop the padding rows
        y = y.view(*shape[:-1], self.out_features).float()
        return y if self.bias is None else y + self.bias


class SharedInputLinear(nn.Module):
    """Linear layers that read the same input (Q, K, V; SwiGLU's gate and up), run as one
    matrix: one kernel call instead of three, which is most of a small model's decode
    step. Each member returns its slice of the joint output. The first member always
    computes the joint output, and another one does when its input is not the tensor
    held; the last member releases it. So no call pattern can see a stale result unless
    a tensor is modified in place between sibling calls (the model never does that), and
    the model's order (first to last) computes once. This runs per layer per token, so it
    is kept to two comparisons.
    """

    def __init__(self, linear: nn.Module, widths: list[int]):
        super().__init__()
        self.linear = linear
        bounds = np.cumsum([0] + widths).tolist()
        # A plain list: the members own this module (as their child), not the other way round.
        self.members = [OutputSlice(self, i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        self.last = len(widths) - 1
        # [input, output] of the pending call, in a list: nn.Module.__setattr__ costs more
        # than the kernel call for a small model, twice per member per token.
        self._held: list[torch.Tensor | None] = [None, None]

    def output(self, x: torch.Tensor, member: int) -> torch.Tensor:
        held = self._held
        if member == 0 or x is not held[0]:
            held[0], held[1] = x, self.linear(x)
        out = held[1]
        if member == self.last:
            held[0] = held[1] = None
        return out


class OutputSlice(nn.Module):
    def __init__(self, shared: SharedInputLinear, index: int, start: int, stop: int):
        super().__init__()
        self.shared = shared  # one module under several names: parameters() counts it once
        self.index, self.start, self.stop = index, start, stop
        self._output = shared.output  # a plain attribute: a submodule lookup goes through nn.Module.__getattr__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(x, self.index)[..., self.start:self.stop]


class GGUFEmbedding(nn.Module):
    """Token embedding over the file's tensor as stored: only looked-up rows are converted."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType):
        super().__init__()
        self.qtype = qtype
        self.register_buffer("data", data, persistent=False)  # (vocab, d) floats or (vocab, row bytes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.data[input_ids], self.qtype)  # (B, T, C)


def make_linear(data: torch.Tensor, qtype: GGMLQuantizationType, bias: torch.Tensor | None) -> nn.Module:
    if qtype in FLOAT_TYPES:
        return float_linear(data.view(TORCH_FLOAT[qtype]), bias)
    if qtype in DEQUANTIZED_TYPES:
        return float_linear(dequantize(data, qtype).to(torch.float16), bias)
    _, type_size = GGML_QUANT_SIZES[qtype]
    return Int4Linear(data.unflatten(-1, (-1, type_size)), qtype, bias)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The layer for an F32 / F16 / BF16 weight on this torch build (see the module docstring)."""
    if weight.dtype == torch.float32:
        return DenseLinear(weight, bias)
    if HAS_FBGEMM:
        as_fp16 = weight.to(torch.float16)  # a copy for bf16, freed once packed
        if weight.dtype == torch.float16 or bool(as_fp16.isfinite().all()):
            return Fp16Linear(as_fp16, bias)
    if weight.dtype == torch.bfloat16 and HAS_ONEDNN_BF16:
        return Bf16Linear(weight, bias)
    return DenseLinear(weight, bias)
