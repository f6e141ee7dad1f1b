"""Round-to-nearest: every weight to its nearest point on the per-group min-max grid
(`quant.grid`), the baseline GPTQ and AWQ are judged against (both papers report it)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from fanformer.quant import register, stages
from fanformer.quant.config import RTNConfig
from fanformer.quant.grid import QuantizedWeight, choose_qparams, dequantize, group_index, quantize


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """W (out, in) -> codes on the grid; error = mean squared weight error ||W - Q||^2 / numel."""
    W = W.float()
    scales, zeros = choose_qparams(W, bits, group_size, sym)
    codes = quantize(W, scales, zeros, bits, group_size)
    Q = dequantize(codes, scales, zeros, group_size)
    error = float((W - Q).pow(2).mean())
    return QuantizedWeight(codes, scales, zeros, group_index(W.shape[1], group_size, W.device), group_size, error,
                           metric="weight_mse")


@register(RTNConfig)
def rtn_handler(model, layers, config: RTNConfig, calibration, progress) -> dict[str, QuantizedWeight]:
    """`quantize`'s handler: every target layer rounded, block by block."""
    results = {}
    for prefix, names in tqdm(stages(model, layers), desc="rtn", unit="block", disable=not progress):
        for name in names:
            results[name] = rtn_quantize(layers[name].weight, config.bits, config.group_size, config.sym)
    return results
