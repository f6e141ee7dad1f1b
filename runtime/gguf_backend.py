"""The GGUF backend: one .gguf file (weights, hyperparameters, tokenizer) run by
`fanformer.model` with its linear layers swapped for ones that compute on the file's
own tensor types.

Format: GGUF v2/v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), read
memory-mapped with gguf-py's `GGUFReader`. Key and tensor names come from
export/gguf_format.py. Two architectures load: `fanformer` (every model option, under the
project's keys) and plain llama.cpp `llama` (p = 0, pre-norm, no CoLA, no gates; the Q
and K rows are un-permuted from llama.cpp's interleaved RoPE layout back to the
rotate-half layout the model uses).

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
- The token embedding keeps its raw blocks (a view of the memory map) and only the
  rows a step looks up are dequantized, with the pure `dequantize_*` functions below.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from export import gguf_format as names
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from runtime.backend import Backend, BackendInfo, register, resolve_device, resolve_dtype

Q = GGMLQuantizationType
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
QUANT_TYPES = (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1)
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


# --- Reading the file: header, config, tokenizer ------------------------------------

def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == names.FILE_SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: Path) -> GGUFReader:
    """The memory-mapped file, or one FANformerError saying what is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise FANformerError(f"{path} is {len(head)} bytes long: too short to be a GGUF file (truncated?)")
    if head[:4] != GGUF_MAGIC:
        raise FANformerError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, not {GGUF_MAGIC!r}")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise FANformerError(f"{path} is GGUF version {version}; this reader supports versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}: convert it with a current llama.cpp")
    try:
        # Copy-on-write: writable arrays for torch without touching the file; nothing is ever written.
        reader = GGUFReader(path, "c")
    except Exception as err:  # gguf-py raises ValueError, IndexError, ... on a malformed header
        raise FANformerError(f"{path} is truncated or corrupted ({type(err).__name__}: {err}); "
                             "export it again") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise FANformerError(f"{path} is truncated: tensor {tensor.name} needs bytes up to "
                                 f"{tensor.data_offset + tensor.n_bytes:,} but the file has {size:,}; export it again")
    return reader


class Metadata:
    """The key/value section, with errors that name the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None, arch: str | None = None):
        key = key.format(arch=arch)
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as err:
            raise FANformerError(f"{self.path}: key {key} cannot be read ({err}); the file is corrupted") from None

    def require(self, key: str, arch: str | None = None, kind: type = int):
        value = self.get(key, arch=arch)
        if value is None:
            raise FANformerError(f"{self.path} has no {key.format(arch=arch)} key: it is incomplete; export it again")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # Stored as float32: take the shortest decimal that rounds to it, so 1e-6 comes back as 1e-6.
            return float(str(np.float32(value)))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FANformerError(f"{self.path}: key {key.format(arch=arch)} is {value!r}, expected a {kind.__name__}")
        return value


def config_from_metadata(meta: Metadata, arch: str, tensor_names: set[str]) -> FANformerConfig:
    """The model config from the keys alone. A llama file is p = 0, pre-norm, no CoLA,
    no gates, tied exactly when it has no output.weight."""
    d_model = meta.require(names.EMBEDDING_LENGTH, arch)
    n_heads = meta.require(names.HEAD_COUNT, arch)
    fields = dict(
        d_model=d_model, n_layers=meta.require(names.BLOCK_COUNT, arch), n_heads=n_heads,
        ffn_dim=meta.require(names.FEED_FORWARD_LENGTH, arch), max_seq_len=meta.require(names.CONTEXT_LENGTH, arch),
        norm_eps=meta.require(names.RMS_EPS, arch, float),
    )
    if arch == names.ARCH:
        fields.update(
            vocab_size=meta.require(names.VOCAB_SIZE, arch), n_kv_heads=meta.require(names.HEAD_COUNT_KV, arch),
            head_dim=meta.require(names.KEY_LENGTH, arch), rope_theta=meta.require(names.ROPE_FREQ_BASE, arch, float),
            p=meta.require(names.FAN_PERIODIC_RATIO, arch, float),
            fan_activation=meta.require(names.FAN_ACTIVATION, arch, str),
            norm=meta.require(names.NORM_SCHEME, arch, str), cola_rank=meta.require(names.COLA_RANK_RATIO, arch, float),
            cola_lm_head=meta.require(names.COLA_LM_HEAD, arch, bool),
            gated_residual=meta.require(names.GATED_RESIDUAL, arch, bool),
            tie_embeddings=meta.require(names.TIE_EMBEDDINGS, arch, bool))
    else:  # llama.cpp's defaults for the keys its llama loader treats as optional
        tokens = meta.get(names.TOKENIZER_TOKENS)
        fields.update(
            vocab_size=meta.get(names.VOCAB_SIZE, len(tokens) if tokens else None, arch),
            n_kv_heads=meta.get(names.HEAD_COUNT_KV, n_heads, arch),
            head_dim=meta.get(names.KEY_LENGTH, d_model // n_heads if n_heads else 0, arch),
            rope_theta=float(str(np.float32(meta.get(names.ROPE_FREQ_BASE, 10000.0, arch)))),
            p=0.0, norm="pre", tie_embeddings="output.weight" not in tensor_names)
        if fields["vocab_size"] is None:
            raise FANformerError(f"{meta.path} has neither {names.VOCAB_SIZE.format(arch=arch)} "
                                 f"nor {names.TOKENIZER_TOKENS}: it is incomplete")
    try:
        config = FANformerConfig(**fields)
    except FANformerError as err:
        raise FANformerError(f"{meta.path}: its hyperparameters are not a valid model ({err})") from None
    if arch == names.ARCH and meta.get(names.FAN_PERIODIC_LENGTH, arch=arch) not in (None, config.d_periodic):
        raise FANformerError(f"{meta.path}: {names.FAN_PERIODIC_LENGTH.format(arch=arch)} disagrees with "
                             f"{names.EMBEDDING_LENGTH.format(arch=arch)} * {names.FAN_PERIODIC_RATIO.format(arch=arch)}")
    return config


def tokenizer_from_metadata(meta: Metadata) -> tuple[Tokenizer, dict[str, int]]:
    """The byte-level BPE from tokenizer.ggml.* (GPT-2's scheme, as fanformer/tokenizer.py
    trains it), and its bos / eos / pad ids. Control tokens become special tokens;
    unused rows (a vocab padded past the tokenizer) are left out, as in tokenizer.json."""
    kind = meta.require(names.TOKENIZER_MODEL, kind=str)
    if kind != names.TOKENIZER_MODEL_GPT2:
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_MODEL} is {kind!r}; only byte-level BPE "
                             f"({names.TOKENIZER_MODEL_GPT2!r}) is supported")
    tokens = meta.require(names.TOKENIZER_TOKENS, kind=list)
    types = meta.get(names.TOKENIZER_TOKEN_TYPE) or [int(TokenType.NORMAL)] * len(tokens)
    merges = meta.require(names.TOKENIZER_MERGES, kind=list)
    if len(types) != len(tokens):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_TOKEN_TYPE} has {len(types)} entries for "
                             f"{len(tokens)} tokens")
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != TokenType.UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_MERGES} holds an entry that is not \"a b\"")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == TokenType.CONTROL])
    eos = meta.require(names.TOKENIZER_EOS_ID)
    ids = {"bos_id": meta.require(names.TOKENIZER_BOS_ID), "eos_id": eos,
           "pad_id": meta.get(names.TOKENIZER_PAD_ID, eos)}
    for name, i in ids.items():
        if not 0 <= i < len(tokens):
            raise FANformerError(f"{meta.path}: the {name.split('_')[0]} token id {i} is outside the "
                                 f"{len(tokens)}-token vocabulary")
    return tok, ids


def llama_unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute on Q or K rows: llama.cpp's
    interleaved RoPE pairs (2i, 2i + 1) back to rotate-half pairs (i, i + hs/2). Rows move
    whole, so this works on quantized rows as stored."""
    out = rows.shape[0]
    return (rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))


# --- The backend ---------------------------------------------------------------------

def _gguf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ne[0] (the row) is the last torch dim


def _release_load_memory(reader: GGUFReader) -> None:
    """Packing reads a tensor from the file and goes through transient copies (int32
    planes, fbgemm's fp32 staging): drop the file pages read so far (pages still in use
    fault back in; nothing ever writes to the copy-on-write map) and hand freed heap back
    to the OS (glibc keeps it otherwise). Run after each layer is packed, so the load
    never holds the file and its repacked copy at once, and resident memory is what the
    model holds."""
    mapped = getattr(reader.data, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


@register("gguf", detect=is_gguf_file)
class GGUFBackend(Backend):
    """Options: device cpu|auto (the int4 kernel is torch's CPU one); dtype, if given,
    must be fp32 (the compute dtype outside the weight kernels)."""

    def __init__(self, path: Path, dtype: str = "fp32", device: str = "cpu"):
        path = Path(path)
        if resolve_dtype(dtype) != torch.float32:
            raise FANformerError(f"the GGUF backend computes in fp32 around the file's own weight types; "
                                 f"--dtype {dtype} is not available (export another --type instead)")
        if device != "auto" and resolve_device(device).type != "cpu":
            raise FANformerError("the GGUF backend runs on the CPU only; use --device cpu")
        if not path.is_file():
            raise FANformerError(f"{path} is not a file: pass the .gguf file itself")
        reader = open_gguf(path)
        meta = Metadata(reader, path)
        arch = meta.require(names.GENERAL_ARCHITECTURE, kind=str)
        if arch not in (names.ARCH, names.LLAMA_ARCH):
            raise FANformerError(f"{path} is a {arch!r} model; this backend runs {names.ARCH!r} and "
                                 f"{names.LLAMA_ARCH!r} files only")
        tensors = {t.name: t for t in reader.tensors}
        self.config = config_from_metadata(meta, arch, set(tensors))
        self.arch = arch
        self.tokenizer, ids = tokenizer_from_metadata(meta)
        self.module = self._build(tensors, path, lambda: _release_load_memory(reader))
        weight_types = "+".join(sorted({t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) > 1}))
        self.info = BackendInfo(format="gguf", path=str(path), vocab_size=self.config.vocab_size,
                                max_seq_len=self.config.max_seq_len, dtype=f"fp32 ({weight_types} weights)",
                                device="cpu", **ids)

    def _build(self, tensors: dict, path: Path, release_load_memory) -> FANformer:
        """The model on the meta device, then every tensor put in place: 2-D weights as
        GGUF layers, 1-D ones (norms, biases, gates) as float32 parameters.
        `release_load_memory()` runs after each layer is built."""
        config = self.config
        with torch.device("meta"):
            model = FANformer(config)
        keys = [k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")]
        by_name = names.tensor_names(keys)  # {GGUF name: state key}
        unknown, missing = set(tensors) - set(by_name), set(by_name) - set(tensors)
        if unknown:
            raise FANformerError(f"{path} holds tensors this {self.arch} model does not have: "
                                 f"{', '.join(sorted(unknown)[:5])}; the file and its hyperparameters disagree")
        if missing:
            raise FANformerError(f"{path} lacks tensors its hyperparameters call for: {', '.join(sorted(missing)[:5])}")
        state = {key: self._tensor(tensors[name], model.state_dict()[key].shape, path)
                 for name, key in by_name.items()}  # {state key: (data, type)}
        if self.arch == names.LLAMA_ARCH:
            for key, n_head in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
                for i in range(config.n_layers):
                    data, qtype = state[f"blocks.{i}.attn.{key}.weight"]
                    state[f"blocks.{i}.attn.{key}.weight"] = (llama_unpermute(data, n_head).contiguous(), qtype)
        if config.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]

        linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        for members in _shared_input_groups(config, linears):
            weights = [state[f"{m}.weight"] for m in members]
            qtypes = {qtype for _, qtype in weights}
            if len(qtypes) > 1 or Q.F32 in qtypes or any(f"{m}.bias" in state for m in members):
                continue  # F32 weights stay zero-copy views of the file
            joint = make_linear(torch.cat([data for data, _ in weights]), qtypes.pop(), None)
            release_load_memory()
            shared = SharedInputLinear(joint, [data.shape[0] for data, _ in weights])
            for name, member in zip(members, shared.members):
                _set_submodule(model, name, member)
                del state[f"{name}.weight"]
        for key, (data, qtype) in state.items():
            owner_name, _, leaf = key.rpartition(".")
            if key == "embed.weight":
                model.embed = GGUFEmbedding(data, qtype)
            elif owner_name in linears and leaf == "weight":
                bias = state.get(f"{owner_name}.bias")
                bias = None if bias is None else dequantize(*bias).clone()
                _set_submodule(model, owner_name, make_linear(data, qtype, bias))
                release_load_memory()
            elif owner_name not in linears:  # norms and residual gates
                module = model.get_submodule(owner_name) if owner_name else model
                module._parameters[leaf] = nn.Parameter(dequantize(data, qtype).clone(), requires_grad=False)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        assert not left, f"tensors not loaded: {left}"
        return model.eval()

    def _tensor(self, tensor, shape: torch.Size, path: Path) -> tuple[torch.Tensor, GGMLQuantizationType]:
        """A tensor as stored, checked against the shape the config implies: a torch view
        of the memory map, (rows, n) for float types and (rows, row bytes) for q* types."""
        qtype, gguf_shape = tensor.tensor_type, _gguf_shape(tensor)
        allowed = FLOAT_TYPES if len(shape) == 1 else FLOAT_TYPES + QUANT_TYPES
        if qtype not in allowed:
            raise FANformerError(f"{path}: tensor {tensor.name} is {qtype.name}; a {len(shape)}-D tensor must be one of "
                                 f"{', '.join(t.name for t in allowed)}")
        if gguf_shape != tuple(shape):
            raise FANformerError(f"{path}: tensor {tensor.name} has shape {gguf_shape}, the hyperparameters imply "
                                 f"{tuple(shape)}; the file is damaged or mixed from two models")
        return torch.from_numpy(tensor.data), qtype  # BF16 comes as bytes: (rows, 2 n) uint8

    def weight_bytes(self) -> int:
        """Bytes of every tensor the model holds (weights, packed planes, norms), and of the
        packed weights that fbgemm keeps outside torch tensors."""
        tensors = {id(t): t for t in list(self.module.parameters()) + list(self.module.buffers())}.values()
        opaque = {id(m): m for m in self.module.modules() if isinstance(m, Fp16Linear)}.values()
        return sum(t.numel() * t.element_size() for t in tensors) + sum(m.held_bytes() for m in opaque)

    def new_cache(self, batch_size: int):
        return self.module.new_cache()

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, cache):
        # An all-ones mask is the plain causal case: leave it out so SDPA takes its fast path.
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        return self.module(input_ids, attention_mask=mask, cache=cache).float()


SHARED_INPUT = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("ffn.gate_proj", "ffn.up_proj"))


def _shared_input_groups(config: FANformerConfig, linears: set[str]) -> list[list[str]]:
    """Linear layers of each block that read the same tensor: Q, K, V and gate, up (with
    CoLA, their first factors A)."""
    groups = []
    for i in range(config.n_layers):
        for group in SHARED_INPUT:
            for factor in ("", ".lora_a"):
                members = [f"blocks.{i}.{name}{factor}" for name in group]
                if all(m in linears for m in members):
                    groups.append(members)
    return groups


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
