"""Post-training weight quantization of FANformer models: one entry point,
`quantize(model, config, calibration)`, with the method picked by the config's type.

    from fanformer.quant import GPTQConfig, quantize
    report = quantize(model, GPTQConfig(bits=4, group_size=128), calibration=tokens)

A method is a handler registered for its config type with `@register(ConfigType)`, in
the module that holds the method (rtn.py, sequential.py for GPTQ, awq.py, bnb.py); the
config type's `method` is its name, its fields are the `fanformer quantize` flags, and
`methods()` imports this package's modules once to collect them. A new method is one
module: its config dataclass (subclassing `QuantConfig`), its math, its handler. A handler
returns, per layer name, a `QuantizedWeight` on the shared grid (`quant.grid`), and this
module swaps the layers for packed `QuantLinear`s (`quant.linear`); the math lives in pure
functions (`rtn.rtn_quantize`, `gptq.gptq_quantize`). A config whose `own_modules` is true
has a handler that swaps its own modules in: bitsandbytes' int8 and nf4 (`quant.bnb`),
and GPTQ on a llama.cpp K-quant grid (`quant.gptq_k`, `GGMLLinear`s).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from fanformer.errors import FANformerError
from fanformer.quant.config import (AWQConfig, BnbInt8Config, BnbNF4Config, GPTQConfig, QuantConfig, RTNConfig,
                                    WeightOnlyConfig)
from fanformer.quant.grid import QuantizedWeight
from fanformer.quant.linear import GGMLLinear, QuantLinear, swap_in, target_linears

Handler = Callable[[nn.Module, dict[str, nn.Linear], QuantConfig, "torch.Tensor | None", bool],
                   dict[str, QuantizedWeight]]
HANDLERS: dict[type, Handler] = {}
METHODS: dict[str, type] = {}  # method name -> its config type


def register(config_type: type):
    """Decorator: the handler that quantizes a model for configs of `config_type`, which
    becomes the method `config_type.method`. For a config whose `own_modules` is true, the
    handler replaces the layers itself and returns per layer only the error."""

    def wrap(handler: Handler) -> Handler:
        HANDLERS[config_type] = handler
        METHODS[config_type.method] = config_type
        return handler

    return wrap


def methods() -> dict[str, type]:
    """Method name -> config type, importing this package's modules (where the handlers
    register) the first time."""
    for module in pkgutil.iter_modules(__path__):  # imported once; later calls find them in sys.modules
        importlib.import_module(f"{__name__}.{module.name}")
    return METHODS


def method_config(name: str, **options) -> QuantConfig:
    """The config of method `name` from keyword options (validated by the config)."""
    known = methods()
    if name not in known:
        raise FANformerError(f"unknown quantization method {name!r}; choose one of {', '.join(known)}")
    return known[name](**options)


def is_quantized(model: nn.Module) -> bool:
    bnb = sys.modules.get("fanformer.quant.bnb")  # imported with the first bitsandbytes layer, and only then
    return any(isinstance(m, (QuantLinear, GGMLLinear)) or (bnb is not None and bnb.is_bnb_linear(m))
               for m in model.modules())


def check_layers(layers: dict[str, nn.Linear], config: WeightOnlyConfig) -> None:
    """Fail before any work on a layer the grid or the packing cannot take."""
    for name, layer in layers.items():
        if config.group_size != -1 and layer.in_features % config.group_size:
            raise FANformerError(
                f"group size {config.group_size} does not divide the input width {layer.in_features} of {name}; "
                f"choose a group size that does, --group-size -1 (per channel), or --keep {name}")
        for width, what in ((layer.in_features, "input width"), (layer.out_features, "output width")):
            if (width * config.bits) % 32:
                raise FANformerError(
                    f"{name}: {what} {width} cannot be packed at {config.bits} bits (the GPTQ layout needs "
                    f"{what} x bits to be a multiple of 32); use other --bits, or --keep {name}")


def quantize(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
             progress: bool = True) -> dict:
    """Quantize `model` in place (its linears become `QuantLinear`s) and return the report:
    the config, and per layer its shape and reconstruction error; `kept` lists the
    linears left in float. `calibration` (samples, seq_len) token ids, for methods that need it."""
    if is_quantized(model):
        raise FANformerError("the model is already quantized; quantize its float checkpoint instead")
    methods()
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise FANformerError(f"no quantization method for {type(config).__name__}; "
                             f"known: {', '.join(c.__name__ for c in HANDLERS)}")
    layers = target_linears(model, config.keep, config.lm_head)
    if not layers:
        raise FANformerError("no layer left to quantize: every linear matches a --keep pattern")
    swaps = config.own_modules
    if not swaps:
        check_layers(layers, config)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        results = handler(model, layers, config, calibration, progress)
        extra = {}
        if isinstance(results, tuple):  # a handler may add its own record to the report
            results, extra = results
        if not swaps:
            swap_in(model, {name: QuantLinear.from_quantized(results[name], config.bits, layers[name].bias)
                            .to(layers[name].weight.device) for name in layers})
    model.train(was_training)
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return {"method": config.method, "config": config.to_dict(), "seconds": time.perf_counter() - start,
            "layers": {name: {"shape": list(layers[name].weight.shape), "metric": results[name].metric,
                              "error": results[name].error} for name in layers},
            "kept": kept, **extra}


def stages(model: nn.Module, layers: dict[str, nn.Linear]) -> list[tuple[str, list[str]]]:
    """Layer names grouped by block ("blocks.0.", ...) then the LM head, in model order."""
    prefixes = [f"blocks.{i}." for i in range(len(model.blocks))] + ["lm_head"]
    stages = [(prefix, [n for n in layers if n.startswith(prefix)]) for prefix in prefixes]
    return [(prefix, names) for prefix, names in stages if names]


__all__ = ["AWQConfig", "BnbInt8Config", "BnbNF4Config", "GPTQConfig", "HANDLERS", "QuantConfig", "QuantLinear",
           "RTNConfig", "WeightOnlyConfig", "is_quantized", "method_config", "methods", "quantize", "register"]
