"""GPTQ whose grid is Q4_K's blocks: the error feedback of GPTQ (Frantar et al. 2022, arXiv
2210.17323) works on the very numbers a Q4_K GGUF tensor stores, so the GGUF export writes
GPTQ's integers without quantizing again. Two ways in: `fanformer quantize --method gptq
--grid q4_k_m` (a checkpoint of `GGMLLinear`s, which `export --type q4_k_m` copies byte for
byte) and `fanformer export --type q4_k_m --gptq` (the same pass at export time).

A Q4_K super-block covers 256 input columns of a row: an fp16 scale d and min dmin, eight
sub-blocks of 32 columns each with a 6-bit scale sc_j and min m_j, and 4-bit codes q:
value = d sc_j q - dmin m_j. GPTQ walks the columns in order (lazy blocks of 128, the
paper's Algorithm 1 as in quant/gptq.py); when it reaches a super-block it fixes that
super-block's d, dmin, sc and m from the weights as updated so far, choosing them with
ggml's own Q4_K quantizer weighted by the Hessian's diagonal (what llama.cpp does with an
importance matrix); then each column's codes are rounded on that grid and the rounding
error is spread over the columns not yet quantized. The blocks are written with ggml's
headers and GPTQ's codes.

Only Q4_K has this pass. Tensors the mixture puts in another type (Q6_K for the output
and some attn_v / ffn_down, fallbacks for rows not in whole super-blocks) are quantized
by ggml with the Hessian's diagonal as their importance matrix, inside the same
block-by-block pass, so later layers still see the quantized layers before them. Nothing
in gguf-py or ggml runs GPTQ, hence this module.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from fanformer.quant import kquants
from fanformer.quant.config import GPTQConfig
from fanformer.quant.gptq import inverse_hessian_cholesky

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPER_BLOCK, SUB_BLOCK = 256, 32
HEADER = 16  # bytes of d, dmin and the 12 bytes of packed 6-bit scales and mins
BLOCK_BYTES = 144


def q4_k_grid(header: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block (scale, min), each (rows, 8), from Q4_K headers (rows, 16)."""
    d = header[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = header[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(header[:, 4:16]))
    return torch.from_numpy(d * sc.astype(np.float32)), torch.from_numpy(dmin * m.astype(np.float32))


def q4_k_blocks(headers: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Q4_K bytes (rows, n_super * 144) from headers (rows, n_super, 16) and codes (rows, columns)
    in 0..15: within a super-block, bytes 32c..32c+31 hold sub-block 2c in their low nibbles
    and sub-block 2c + 1 in their high ones."""
    rows, n_super = headers.shape[:2]
    q = codes.reshape(rows, n_super, 4, 2, SUB_BLOCK).astype(np.uint8)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, n_super, 128)
    return np.concatenate([headers, qs], axis=-1).reshape(rows, n_super * BLOCK_BYTES)


def gptq_q4_k(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01, blocksize: int = 128,
              name: str = "layer") -> tuple[np.ndarray, torch.Tensor, float]:
    """GPTQ of W (out, in) on the Q4_K grid given the Hessian H (in, in) of its inputs.
    Returns (Q4_K bytes (out, in / 256 * 144), the dequantized weight, GPTQ's loss)."""
    W, H = W.clone().float(), H.clone().float()
    rows, columns = W.shape
    if columns % SUPER_BLOCK:
        raise ValueError(f"{name}: {columns} columns are not whole Q4_K super-blocks of {SUPER_BLOCK}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diag(H).numpy().astype(np.float32)
    Hinv = inverse_hessian_cholesky(H, percdamp, name)
    headers = np.zeros((rows, columns // SUPER_BLOCK, HEADER), dtype=np.uint8)
    codes = torch.zeros(rows, columns, dtype=torch.int64)
    loss = 0.0
    scales = mins = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if column % SUPER_BLOCK == 0:  # fix this super-block's grid from the weights as they are now
                span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :SUPER_BLOCK]
                block = kquants.quantize(span.numpy(), Q.Q4_K, importance[column:column + SUPER_BLOCK])
                headers[:, column // SUPER_BLOCK] = block[:, :HEADER]
                scales, mins = q4_k_grid(block[:, :HEADER])
            j = (column % SUPER_BLOCK) // SUB_BLOCK
            scale, low = scales[:, j], mins[:, j]
            w = W1[:, i]
            code = torch.where(scale > 0, torch.round((w + low) / scale.clamp(min=1e-30)), 0).clamp(0, 15)
            q = scale * code - low
            codes[:, column] = code.long()
            d = Hinv1[i, i]
            loss += float(((w - q) ** 2).sum() / d**2 / 2)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    data = q4_k_blocks(headers, codes.numpy())
    # The stored bytes are the grid GPTQ used: gguf-py's reading of them gives its q back.
    return data, torch.from_numpy(dequantize(data, Q.Q4_K)).reshape(rows, columns), loss


def gptq_tensors(model: nn.Module, kind: str, calibration: torch.Tensor, config: GPTQConfig,
                 layers: dict[str, nn.Linear] | None = None, *, pure: bool = False,
                 progress: bool = True) -> dict[str, tuple[GGMLQuantizationType, np.ndarray, float]]:
    """{layer name: (type, bytes (rows, row bytes), error)} for `layers` of the float `model`
    (default: every block linear and an untied LM head), quantized block by block on
    `calibration` windows: GPTQ on the Q4_K grid where the mixture `kind` (`pure`: its base
    type everywhere) says Q4_K,
    Hessian-diagonal-weighted ggml quantization elsewhere; error is ||W - Q||_F / ||W||_F.
    `model`'s weights are replaced by what is stored."""
    from fanformer.quant import stages
    from fanformer.quant.sequential import gptq_sequential

    c = model.config
    if layers is None:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
                  and (name.startswith("blocks.") or (name == "lm_head" and not c.tie_embeddings))}
    written: dict[str, tuple[GGMLQuantizationType, np.ndarray, float]] = {}
    counts = {"gptq": 0, "weighted": 0}

    def quantize_layer(name: str, weight: torch.Tensor, H: torch.Tensor):
        wanted = kquants.mixture_type(kquants.gguf_tensor_name(f"{name}.weight"), kind, c.n_layers,
                                      c.n_heads // c.n_kv_heads, c.tie_embeddings, True, pure)
        qtype = kquants.fallback_type(wanted, weight.shape[1])
        if qtype == Q.Q4_K:
            data, dequantized, _ = gptq_q4_k(weight, H, config.percdamp, config.blocksize, name)
            counts["gptq"] += 1
        elif qtype in (Q.F16, Q.F32):
            data = weight.to(torch.float16 if qtype == Q.F16 else torch.float32).numpy().view(np.uint8)
            dequantized = torch.from_numpy(dequantize(data, qtype)).reshape(weight.shape)
            counts["weighted"] += 1
        else:
            data = kquants.quantize(weight.float().numpy(), qtype, torch.diag(H).float().numpy())
            dequantized = torch.from_numpy(dequantize(data, qtype)).reshape(weight.shape)
            counts["weighted"] += 1
        error = float((dequantized - weight.float()).norm() / weight.float().norm().clamp_min(1e-30))
        written[name] = (qtype, data, error)
        return data, dequantized

    gptq_sequential(model, layers, config, calibration, stages(model, layers), progress, quantize_layer)
    log.info("GPTQ on the Q4_K grid: %d tensors; %d others (another type in %s) weighted by the Hessian "
             "diagonal", counts["gptq"], counts["weighted"], kind)
    return written


class LayerError:
    """A layer's entry in the quantization report: its relative weight error."""

    metric = "relative_weight_error"

    def __init__(self, error: float):
        self.error = error


def gptq_k_quantize(model: nn.Module, layers: dict[str, nn.Linear], config: GPTQConfig,
                    calibration: torch.Tensor, progress: bool) -> dict[str, LayerError]:
    """`quantize`'s handler for GPTQConfig(grid=q4_k_m / q4_k_s): swap each of `layers` for a
    `GGMLLinear` holding the blocks `gptq_tensors` wrote."""
    from fanformer.quant.linear import GGMLLinear, swap_in

    written = gptq_tensors(model, config.grid, calibration, config, layers, progress=progress)
    swap_in(model, {name: GGMLLinear.from_blocks(data, qtype, layers[name].in_features, layers[name].bias)
                    .to(layers[name].weight.device) for name, (qtype, data, _) in written.items()})
    return {name: LayerError(error) for name, (_, _, error) in written.items()}
