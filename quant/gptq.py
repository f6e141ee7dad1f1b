"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", arXiv 2210.17323), Algorithm 1,
read line by line against the paper and its reference code (IST-DASLab/gptq `gptq.py`).

The published library, AutoGPTQ, is unmaintained, and its successor GPTQModel needs CUDA
for quantization; this CPU-first project therefore carries its own implementation of the
algorithm. It writes the same checkpoint layout (`quant/packing.py`).

For a linear layer with weight W (out, in) and calibration inputs X (tokens, in):

    H = 2 X^T X / n                     (accumulated with a running mean over batches)
    dead columns (H_ii = 0): H_ii = 1, W[:, i] = 0   (an input that is always 0)
    H += percdamp * mean(diag H) * I    (dampening, 1% by default)
    Hinv = Cholesky(H^-1)^T             (upper factor of the inverse)
    column by column, in lazy blocks of `blocksize` (128) columns:
        q = quant(w);  Err1 = (w - q) / Hinv_ii;  W[:, i:] -= Err1 Hinv[i, i:]
    and after each block the accumulated Err1 updates every later column at once.

act_order processes columns by decreasing H_ii (the paper's "desc_act"); with groups,
a group is `group_size` consecutive columns in that order, so `g_idx` records each
input column's group. A group's grid is found when its first column is reached, from
the weights as updated up to the start of the current lazy block, as the reference
code does (`W[:, i1+i : i1+i+groupsize]`).

A Hessian that is not positive definite after dampening (a degenerate calibration set)
is retried with ten times the dampening, up to `DAMP_RETRIES` times, each retry logged;
a non-finite Hessian (inf/nan activations) is an error.
"""

from __future__ import annotations

import logging
import math

import torch

from fanformer.errors import FANformerError
from fanformer.quant.grid import QuantizedWeight, choose_qparams, max_code

log = logging.getLogger(__name__)

DAMP_RETRIES = 4


class Hessian:
    """H = 2 X^T X / n over calibration inputs, with the reference's running-mean update
    (n counts sequences, as the reference does; only H's direction matters to GPTQ)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """inp (B, T, in) or (B, in): the layer's inputs for B sequences."""
        tmp = inp.shape[0] if inp.dim() > 1 else 1
        inp = inp.reshape(-1, inp.shape[-1]).float().t()  # (in, tokens)
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, retrying with more dampening if needed."""
    if not torch.isfinite(H).all():
        raise FANformerError(f"{name}: the Hessian has non-finite entries (the calibration inputs overflow); "
                             "check the checkpoint for inf/nan weights, or leave the layer in float with --keep")
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(DAMP_RETRIES + 1):
        damp = percdamp * 10**attempt * mean_diag
        Hd = H.clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        if attempt < DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with dampening %.3g; retrying with %.3g",
                        name, percdamp * 10**attempt, percdamp * 10 ** (attempt + 1))
    raise FANformerError(f"{name}: the Hessian is not positive definite even with {percdamp * 10**DAMP_RETRIES:.3g} "
                         "dampening; use more (or more varied) calibration data, or --keep the layer")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                  name: str = "layer") -> QuantizedWeight:
    """Quantize W (out, in) given the Hessian H (in, in) of its inputs; error = GPTQ's loss,
    sum over weights of (w - q)^2 / Hinv_ii^2 / 2."""
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape
    maxq = max_code(bits)
    if not torch.isfinite(H).all():
        inverse_hessian_cholesky(H, percdamp, name)  # raises the non-finite error
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    size = columns if group_size == -1 else group_size
    dev = W.device
    scales = torch.zeros(rows, columns // size, device=dev)
    zeros = torch.zeros(rows, columns // size, dtype=torch.int32, device=dev)
    if group_size == -1:
        scales, zeros = choose_qparams(W, bits, -1, sym)

    perm = torch.arange(columns, device=dev)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv = inverse_hessian_cholesky(H, percdamp, name)
    Codes = torch.zeros(rows, columns, dtype=torch.int32, device=dev)
    Losses = torch.zeros_like(W)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Codes1 = torch.zeros(rows, count, dtype=torch.int32, device=dev)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            g = (i1 + i) // size
            if group_size != -1 and (i1 + i) % group_size == 0:
                s, z = choose_qparams(W[:, i1 + i:i1 + i + size], bits, -1, sym)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            scale, zero = scales[:, g], zeros[:, g].float()
            code = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (code - zero)
            Codes1[:, i] = code.to(torch.int32)
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Codes[:, i1:i2] = Codes1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    # Back to the layer's column order; g_idx says which group each column was quantized in.
    g_idx = torch.arange(columns, dtype=torch.int32, device=dev) // size
    if act_order:
        invperm = torch.argsort(perm)
        Codes = Codes[:, invperm]
        g_idx = g_idx[invperm]
    return QuantizedWeight(Codes, scales, zeros, g_idx, group_size, float(Losses.sum()), metric="gptq_loss")
