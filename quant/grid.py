"""The per-group min-max integer grid shared by RTN, GPTQ and AWQ.

This is the grid of GPTQ's reference quantizer (Frantar et al. 2022, arXiv 2210.17323;
IST-DASLab/gptq `quant.py`): for each output row and each group of `group_size` input
columns, the range [min(w, 0), max(w, 0)] is cut into 2^bits - 1 steps,

    scale = (xmax - xmin) / maxq,   zero = round(-xmin / scale)            (asymmetric)
    xmax = max(|xmin|, xmax), xmin = -xmax, zero = (maxq + 1) / 2          (symmetric)
    q = clamp(round(w / scale) + zero, 0, maxq),   w' = scale * (q - zero)

Two project rules on top, both so that what is quantized is exactly what the GPTQ
checkpoint stores (`quant/packing.py`):
- scales are rounded to fp16 here, because the checkpoint stores them in fp16;
- an asymmetric zero point is at least 1, because the v1 GPTQ layout stores zero - 1 in
  an unsigned field and cannot hold zero = 0. When the min-max grid would put zero at 0
  (a group that is almost entirely >= 0), the scale is widened to xmax / (maxq - 1) with
  zero 1, which still covers the group's range: nothing is clipped.

Shapes: w (out, in); scales and zeros (out, groups); codes (out, in) int. `g_idx` (in,)
maps each input column to its group (act-order permutes it); by default column j is in
group j // group_size. group_size = -1 means one group per row (per-channel).
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return 2**bits - 1


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """The default g_idx: contiguous groups of `group_size` columns."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // size


def choose_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales (fp32 holding fp16 values) and integer zero points, (out, groups) each."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    grouped = w.float().reshape(out_features, in_features // size, size)  # (out, groups, size)
    return _minmax(grouped.amin(-1), grouped.amax(-1), bits, sym)


def _minmax(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for ranges [wmin, wmax] (any shape): the range always includes 0."""
    maxq = max_code(bits)
    xmin, xmax = wmin.clamp(max=0), wmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero group: any scale works, keep the reference's
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = _fp16_up((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        low = zero < 1  # v1 checkpoints cannot store zero 0: widen the step, zero 1
        scale = torch.where(low, _fp16_up(xmax / (maxq - 1)), scale)
        zero = torch.where(low, 1.0, zero)
    return scale, zero.to(torch.int32)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Round to an fp16 value not below x (so the rounded grid still covers the range)."""
    h = x.half().float()
    bigger = torch.nextafter(x.half(), torch.full_like(x, float("inf"), dtype=torch.float16)).float()
    return torch.where(h < x, bigger, h)


def quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1], (out, in) int32."""
    g = group_index(w.shape[1], group_size, w.device) if g_idx is None else g_idx
    scale, zero = scales[:, g.long()], zeros[:, g.long()].float()  # (out, in)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, max_code(bits)).to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """w' = scale * (q - zero), (out, in) fp32."""
    g = group_index(codes.shape[1], group_size, codes.device) if g_idx is None else g_idx
    return scales[:, g.long()].float() * (codes.float() - zeros[:, g.long()].float())


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize one column (out,) on its group's grid: GPTQ's inner step."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))
    return scale * (q - zero)


class QuantizedWeight:
    """A weight on the grid: codes (out, in), scales and zeros (out, groups), g_idx (in,),
    and the method's reconstruction error for the report."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 group_size: int, error: float, metric: str):
        self.codes, self.scales, self.zeros, self.g_idx = codes, scales, zeros, g_idx
        self.group_size, self.error, self.metric = group_size, error, metric

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, self.g_idx)
