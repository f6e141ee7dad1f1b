"""Importance matrices (llama.cpp's `llama-imatrix`): for every linear layer, the sum over
calibration tokens of each input column's squared activation, and the token count.

Their ratio, the per-column mean of x^2, is the diagonal of GPTQ's Hessian H = 2 X X^T / n
up to the factor 2: the weight on each column's squared rounding error that llama.cpp's
quantizers minimise (`ggml_quantize_chunk`'s `imatrix`). Every nn.Linear of the model is
observed, FANformer's own included (the FAN projection, both CoLA factors, the LM head),
keyed by its weight's state_dict name; export/gguf_imatrix.py writes them in llama.cpp's
imatrix GGUF format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class Importance:
    """One layer's statistics over the calibration tokens."""

    sum_x2: np.ndarray  # (in_features,) float64: the sum over tokens of x^2 per input column
    count: int  # tokens seen

    @property
    def mean(self) -> np.ndarray:
        return (self.sum_x2 / max(self.count, 1)).astype(np.float32)


@torch.no_grad()
def collect_importance(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, Importance]:
    """Run the float `model` over calibration `windows` (n, seq_len) one window at a time and
    return {weight state_dict key: Importance} for every nn.Linear (tied weights once)."""
    model.eval()
    stats: dict[str, Importance] = {}
    hooks = []
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            key = f"{name}.weight"
            stats[key] = Importance(np.zeros(module.in_features, dtype=np.float64), 0)
            hooks.append(module.register_forward_pre_hook(_accumulate(stats[key])))
    try:
        for window in tqdm(windows, desc="imatrix", unit="window", disable=not progress):
            model(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _accumulate(entry: Importance):
    def hook(module, inputs):
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, in)
        entry.sum_x2 += x.pow(2).sum(0).double().numpy()
        entry.count += x.shape[0]

    return hook
