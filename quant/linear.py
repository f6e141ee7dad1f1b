"""`QuantLinear`: a linear layer whose weight stays packed in the GPTQ layout in memory;
`GGMLLinear`: one held as llama.cpp's blocks of a ggml type (a K-quant GPTQ checkpoint);
and the thin module-swapping layer that puts them in place of `nn.Linear`."""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from fanformer.errors import FANformerError
from fanformer.quant.grid import QuantizedWeight
from fanformer.quant.packing import dequantize_packed, pack


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as qweight/qzeros/scales/g_idx buffers (`quant.packing`).

    The forward unpacks and dequantizes the weight on every call (vectorised shifts, no
    cached float copy), so memory holds bits/16 of an fp16 weight.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, **int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, **int32))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bits: int, bias: torch.Tensor | None) -> "QuantLinear":
        out_features, in_features = weight.codes.shape
        layer = cls(in_features, out_features, bits, weight.group_size, bias is not None)
        for key, tensor in pack(weight.codes, weight.scales, weight.zeros, weight.g_idx, bits).items():
            setattr(layer, key, tensor)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """W (out, in) in fp32."""
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class GGMLLinear(nn.Module):
    """y = x W^T + b with W held as `qblocks` (out, row bytes): each row in llama.cpp's blocks
    of one ggml type, byte for byte what a GGUF file stores (GGUF export copies them).

    The forward uses the blocks' dequantization (gguf-py's), made at the first call and
    kept: the PyTorch form of these checkpoints is their reference, the GGUF engines run the
    blocks themselves.
    """

    def __init__(self, in_features: int, out_features: int, qtype: GGMLQuantizationType, bias: bool, device=None):
        super().__init__()
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if in_features % block:
            raise FANformerError(f"rows of {in_features} are not whole {qtype.name} blocks of {block}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, GGMLQuantizationType(qtype)
        self.register_buffer("qblocks", torch.zeros(out_features, in_features // block * block_bytes,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, qtype: GGMLQuantizationType, in_features: int,
                    bias: torch.Tensor | None) -> "GGMLLinear":
        layer = cls(in_features, blocks.shape[0], qtype, bias is not None)
        layer.qblocks = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.uint8))
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """W (out, in) in fp32."""
        with np.errstate(invalid="ignore", over="ignore"):  # damaged scales: the loader checks the result
            values = dequantize(self.qblocks.cpu().numpy(), self.qtype)
        return torch.from_numpy(values.reshape(self.out_features, self.in_features)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None or self._weight.device != x.device:
            self._weight = self.dequantized_weight().to(x.device)
        return F.linear(x, self._weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={self.qtype.name.lower()}, bias={self.bias is not None}")


def target_linears(model: nn.Module, keep: tuple[str, ...] = (), lm_head: bool = False) -> dict[str, nn.Linear]:
    """The nn.Linear modules to quantize, by name: every linear in every block (FAN
    projection, q/k/v/o, gate/up/down, each CoLA factor on its own), and the LM head's
    linears when asked and not tied to the embedding; minus those a keep pattern names
    (`kept`)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_blocks = name.startswith("blocks.")
        head = name.startswith("lm_head") and lm_head and not getattr(model.config, "tie_embeddings", False)
        if (in_blocks or head) and not kept(name, keep):
            found[name] = module
    return found


def kept(name: str, keep: tuple[str, ...]) -> bool:
    """Does a keep pattern (fnmatch) name this module or a module holding it? So
    "blocks.*.attn.fan.proj" keeps the FAN projection whether it is one linear or a CoLA
    layer's two factors (`proj.lora_a`, `proj.lora_b`)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in keep)


def stored_linear(model: nn.Module, name: str, file, key: str) -> nn.Linear:
    """The model's linear `name`, which the checkpoint `file` stores as `key`; an error
    naming the key if the model has no such linear (a file for another model)."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Linear):
        raise FANformerError(f"{file}: {key} names no linear layer of this model")
    return layer


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def swap_in(model: nn.Module, layers: dict[str, QuantLinear]) -> nn.Module:
    """Replace the named nn.Linear modules of `model` by their QuantLinear."""
    for name, layer in layers.items():
        set_module(model, name, layer)
    return model


def dequantized_model(model: nn.Module) -> tuple[nn.Module, dict[str, QuantLinear | GGMLLinear]]:
    """`model` with each QuantLinear / GGMLLinear replaced by an nn.Linear of its dequantized
    weight; returns the model and the quantized layers by name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, GGMLLinear))}
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        set_module(model, name, linear)
    return model, layers
