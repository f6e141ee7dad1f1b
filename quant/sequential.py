"""GPTQ over a whole FANformer, block after block, as in the paper (Section 4, and the
reference code's `llama_sequential`): the calibration batch is embedded once; each
block's linears get their Hessians from that block's inputs (forward hooks on every
linear), are quantized, and the block is run again with its quantized weights to give
the next block's inputs, so every block is calibrated on what the quantized model before
it really produces. The LM head, when quantized, is the last stage (after the final norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from fanformer.errors import FANformerError
from fanformer.model import rope_cos_sin
from fanformer.quant import register, stages
from fanformer.quant.config import GPTQConfig
from fanformer.quant.gptq import Hessian, gptq_quantize
from fanformer.quant.grid import QuantizedWeight


class Stages:
    """The calibration batch pushed through the model one stage at a time: `inputs` holds
    the current stage's inputs, one (B, T, C) tensor per batch of `batch_size` windows."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, batch_size: int):
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise FANformerError(f"calibration must be (samples, seq_len) token ids, got shape "
                                 f"{tuple(calibration.shape)}")
        seq_len = calibration.shape[1]
        if seq_len > model.config.max_seq_len:
            raise FANformerError(f"calibration windows of {seq_len} tokens exceed the model's max_seq_len "
                                 f"{model.config.max_seq_len}; lower --calib-seq-len")
        self.model = model
        device = model.embed.weight.device
        positions = torch.arange(seq_len, device=device)[None]
        self.cos, self.sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta)  # (1, 1, T, hs)
        self.inputs = [model.embed(batch) for batch in calibration.to(device).split(batch_size)]  # block 0's

    def run(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """One stage ("blocks.3." or "lm_head") on one batch of its inputs."""
        if prefix == "lm_head":
            return self.model.lm_head(self.model.norm(x))
        return self.model.blocks[int(prefix.split(".")[1])](x, self.cos, self.sin, None)

    def advance(self, prefix: str) -> None:
        """Replace the inputs by the stage's outputs (with its weights as they are now)."""
        if prefix != "lm_head":
            self.inputs = [self.run(prefix, x) for x in self.inputs]


def gptq_sequential(model: nn.Module, layers: dict[str, nn.Linear], config: GPTQConfig, calibration: torch.Tensor,
                    stages: list[tuple[str, list[str]]], progress: bool,
                    quantize_layer: Callable[[str, torch.Tensor, torch.Tensor], tuple[object, torch.Tensor]] | None = None
                    ) -> dict[str, object]:
    """Quantize `layers` stage by stage; each layer by `gptq_quantize` on the config's grid,
    or by `quantize_layer(name, weight, H) -> (result, dequantized weight)` when given (a
    GPTQ on another grid: quant/gptq_k.py's Q4_K). Returns {name: result}."""
    device = model.embed.weight.device
    run = Stages(model, calibration, config.batch_size)
    results = {}
    bar = tqdm(total=len(stages), desc="gptq", unit="block", disable=not progress)
    for prefix, names in stages:
        bar.set_postfix_str(prefix.rstrip("."))
        hessians = {name: Hessian(layers[name].in_features, device=device) for name in names}
        hooks = [layers[name].register_forward_hook(
            lambda module, inputs, output, h=hessians[name]: h.add_batch(inputs[0].detach()))
            for name in names]
        try:
            for x in run.inputs:
                run.run(prefix, x)
        finally:
            for hook in hooks:
                hook.remove()
        for name in names:
            layer = layers[name]
            if quantize_layer is None:
                result = gptq_quantize(layer.weight.data, hessians[name].H, config.bits, config.group_size,
                                       config.sym, act_order=config.act_order, percdamp=config.percdamp,
                                       blocksize=config.blocksize, name=name)
                weight = result.dequantize()
            else:
                result, weight = quantize_layer(name, layer.weight.data, hessians[name].H)
            layer.weight.data.copy_(weight.to(layer.weight.dtype))
            results[name] = result
            del hessians[name]
        run.advance(prefix)  # the quantized block's outputs feed the next
        bar.update()
    bar.close()
    return results


@register(GPTQConfig)
def gptq_handler(model, layers, config: GPTQConfig, calibration, progress) -> dict[str, QuantizedWeight]:
    """`quantize`'s handler for GPTQ."""
    if calibration is None:
        raise FANformerError("GPTQ needs calibration data: pass calibration token windows (samples, seq_len)")
    if config.own_modules:  # a llama.cpp K-quant grid
        from fanformer.quant.gptq_k import gptq_k_quantize

        return gptq_k_quantize(model, layers, config, calibration, progress)
    return gptq_sequential(model, layers, config, calibration, stages(model, layers), progress)
