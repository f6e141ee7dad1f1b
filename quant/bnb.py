"""bitsandbytes weights for FANformer's linear layers: LLM.int8() and NF4.

LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", arXiv 2208.07339): every weight row is stored in int8 with its
absmax (vector-wise quantization: `weight` = CB, `SCB`). At run time each activation row is
quantized the same way and multiplied in int8, except the input columns holding a value
of magnitude >= `threshold` (the paper's 6.0): those few outlier features are multiplied
in float against the dequantized weight columns (mixed-precision decomposition).

NF4 (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv
2305.14314): each block of 64 consecutive weights (row-major, so a block may span rows)
is scaled by its absmax onto the 16 NormalFloat levels (quantiles of N(0, 1)), two codes
per byte; double quantization stores the fp32 block absmaxes in 8 bits too.

bitsandbytes does the quantization, the int8 kernels and the serialization: the tensors
saved are its modules' own `state_dict` (int8 `weight` + `SCB`; 4-bit `weight` +
`weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`, ...), the
layout transformers loads. This module adds the layer swap, a per-layer reconstruction
error, the checkpoint's `quantization_config` in transformers' `BitsAndBytesConfig` keys,
loading those tensors straight back into bnb modules (never through float), and one fix:
`NF4Linear` (below) dequantizes correctly on every CPU.

Importing this module imports bitsandbytes (seconds), so the rest of `quant` imports it
only when a bitsandbytes method is used.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fanformer.errors import FANformerError
from fanformer.quant import register
from fanformer.quant.config import BNB_QUANT_METHOD, BnbConfig, BnbInt8Config, BnbNF4Config
from fanformer.quant.linear import set_module, stored_linear
from fanformer.validate import foreign_errors


class _DropFp16CastNotice(logging.Filter):
    """LLM.int8() quantizes activations from fp16; bnb logs that cast as a warning on every
    forward of every layer given fp32 input. It is the algorithm, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


# On CPUs with AVX512-BF16, bnb's CPU backend warns at import that the optional `kernels`
# package is missing. That package only speeds up bnb's packed bf16 4-bit path, which
# `NF4Linear` never takes, so the warning would only mislead.
_cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
_level = _cpu_log.level
_cpu_log.setLevel(logging.ERROR)
try:
    import bitsandbytes as bnb
finally:
    _cpu_log.setLevel(_level)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropFp16CastNotice())

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NF4_STATE = "weight.quant_state.bitsandbytes__nf4"  # the key that marks a 4-bit layer's tensors
METRIC = "weight_rel_error"  # ||W - dequant(Q(W))||_F / ||W||_F


def dequantize_nf4(weight: "bnb.nn.Params4bit") -> torch.Tensor:
    """W (out, in) from a Params4bit, in its quant state's dtype, by bnb's own kernel.

    The kernel is handed the weight as rows of whole blocks: bnb 0.50's CPU kernel puts
    the block absmaxes in the wrong places when a row is not a whole number of blocks (a
    CoLA factor of rank 16 with blocks of 64, an input width of 96), while the blocks
    themselves run over the flattened weight, so any such view holds the same data."""
    state = weight.quant_state
    n, block = state.shape.numel(), state.blocksize
    flat = copy.copy(state)
    flat.shape = torch.Size([n // block, block] if n % block == 0 else [1, n])
    return bnb.functional.dequantize_4bit(weight.data, flat).reshape(state.shape)


class NF4Linear(bnb.nn.Linear4bit):
    """bnb's 4-bit linear (same parameters, same state_dict) computing x @ dequant(W)^T + b
    in `compute_dtype` on every device: the path bnb itself takes on a CPU without
    AVX512-BF16, with `dequantize_nf4` for the kernel's misplaced blocks. bnb's AVX512-BF16
    path is not taken: it computes in bf16, fails on output widths that are not a multiple
    of 32 (the FAN projection), and repacks the weight so that a later save is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_nf4(self.weight).to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


def _int8_module(in_features: int, out_features: int, bias: torch.Tensor | None, threshold: float) -> nn.Module:
    module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                 threshold=threshold, device="meta")
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return module


def _nf4_module(in_features: int, out_features: int, bias: torch.Tensor | None, compute_dtype: str,
                double_quant: bool) -> nn.Module:
    module = NF4Linear(in_features, out_features, bias=bias is not None, compute_dtype=COMPUTE_DTYPES[compute_dtype],
                       compress_statistics=double_quant, quant_type="nf4", device="meta")
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return module


def quantized_module(layer: nn.Linear, config: BnbConfig) -> nn.Module:
    """`layer` as a bnb module, quantized by bnb (its Int8Params / Params4bit `.to(device)`)."""
    weight, device = layer.weight.detach().float().cpu(), layer.weight.device  # bnb quantizes on a move from CPU
    if isinstance(config, BnbInt8Config):
        module = _int8_module(layer.in_features, layer.out_features, layer.bias, config.threshold)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        module = _nf4_module(layer.in_features, layer.out_features, layer.bias, config.compute_dtype,
                             config.double_quant)
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=config.blocksize,
                                          compress_statistics=config.double_quant, quant_type="nf4",
                                          module=module).to(device)
    return module.eval()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W (out, in) in fp32, as the layer multiplies by it (int8: bnb's row dequantization)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return dequantize_nf4(module.weight).float()
    scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # moved by the first forward
    return bnb.functional.int8_vectorwise_dequant(module.weight.data, scb).float()


def is_bnb_linear(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


@dataclass(frozen=True)
class LayerError:
    """The report's per-layer entry (what `QuantizedWeight` gives for the GPTQ-grid methods)."""

    error: float
    metric: str = METRIC


def bnb_quantize(model: nn.Module, layers: dict[str, nn.Linear], config: BnbConfig,
                 progress: bool = False) -> dict[str, LayerError]:
    """Swap each named linear of `model` for its bnb module; per layer, the relative error of
    the weight it multiplies by against the float weight."""
    results = {}
    for name, layer in tqdm(layers.items(), desc=config.method, unit="layer", disable=not progress):
        module = quantized_module(layer, config)
        weight = layer.weight.detach().float()
        error = (dequantized_weight(module).to(weight.device) - weight).norm() / weight.norm().clamp_min(1e-30)
        results[name] = LayerError(float(error))
        set_module(model, name, module)
    return results


# --- Checkpoints -----------------------------------------------------------------

def quantization_config(config: BnbConfig, kept: list[str]) -> dict:
    """config.json's quantization_config: every key of transformers' BitsAndBytesConfig (so
    `from_pretrained` takes the checkpoint as prequantized), then this tool's own."""
    int8 = isinstance(config, BnbInt8Config)
    nf4 = BnbNF4Config() if int8 else config  # transformers writes the 4-bit keys for int8 too
    return {"quant_method": BNB_QUANT_METHOD, "load_in_8bit": int8, "load_in_4bit": not int8,
            "llm_int8_threshold": config.threshold if int8 else BnbInt8Config().threshold,
            "llm_int8_skip_modules": list(kept), "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": nf4.double_quant,
            "bnb_4bit_compute_dtype": nf4.compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_blocksize": nf4.blocksize,  # not transformers': bnb reads it from each layer's state
            "method": config.method, "lm_head": config.lm_head, "keep": list(config.keep)}


def config_from_quantization_config(qconfig: dict, path: Path) -> BnbConfig:
    """The config a checkpoint was quantized with, from its quantization_config."""
    int8, four = qconfig.get("load_in_8bit") is True, qconfig.get("load_in_4bit") is True
    if int8 == four or (four and qconfig.get("bnb_4bit_quant_type") != "nf4"):
        raise FANformerError(f"{path}: unsupported bitsandbytes quantization_config (load_in_8bit "
                             f"{qconfig.get('load_in_8bit')!r}, load_in_4bit {qconfig.get('load_in_4bit')!r}, "
                             f"bnb_4bit_quant_type {qconfig.get('bnb_4bit_quant_type')!r}); this tool reads int8 "
                             "and nf4 checkpoints")
    common = dict(keep=tuple(qconfig.get("keep", ())), lm_head=bool(qconfig.get("lm_head", False)))
    try:
        if int8:
            return BnbInt8Config(threshold=qconfig.get("llm_int8_threshold", BnbInt8Config().threshold), **common)
        return BnbNF4Config(blocksize=qconfig.get("bnb_4bit_blocksize", BnbNF4Config().blocksize),
                            compute_dtype=qconfig.get("bnb_4bit_compute_dtype", "float32"),
                            double_quant=bool(qconfig.get("bnb_4bit_use_double_quant", False)), **common)
    except FANformerError as err:
        raise FANformerError(f"{path}: {err}") from None


def _loaded_module(name: str, layer: nn.Linear, state: dict[str, torch.Tensor], config: BnbConfig,
                   file: Path) -> nn.Module:
    """The bnb module of one quantized linear, holding the checkpoint's tensors as they are."""
    weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    shape = (layer.out_features, layer.in_features)
    if weight is None:
        raise FANformerError(f"{file}: {name}.weight is missing; the checkpoint is damaged")
    if bias is not None and (tuple(bias.shape) != shape[:1] or not bias.is_floating_point()):
        # the module is built from the file's own bias, so load_state's shape check cannot see this
        raise FANformerError(f"{file}: {name}.bias is {bias.dtype} {tuple(bias.shape)}; config.json implies "
                             f"a float {shape[:1]}")
    if isinstance(config, BnbInt8Config):
        scb = state.get(f"{name}.SCB")
        if scb is None or not scb.is_floating_point():
            raise FANformerError(f"{file}: {name}.SCB is missing or not a float tensor; the checkpoint is damaged")
        layout = state.get(f"{name}.weight_format")  # bnb's own key: 0, row-major, is the only CPU layout
        if layout is not None and (layout.numel() != 1 or layout.is_floating_point() or int(layout) != 0):
            raise FANformerError(f"{file}: {name}.weight_format is {layout.tolist()}, expected 0 (row-major int8)")
        if weight.dtype != torch.int8 or tuple(weight.shape) != shape or tuple(scb.shape) != shape[:1]:
            raise FANformerError(f"{file}: {name} holds weight {weight.dtype} {tuple(weight.shape)} with SCB "
                                 f"{tuple(scb.shape)}; config.json implies int8 {shape} and SCB {shape[:1]}")
        module = _int8_module(layer.in_features, layer.out_features, bias, config.threshold)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                          SCB=scb.float())
        return module
    module = _nf4_module(layer.in_features, layer.out_features, bias, config.compute_dtype, config.double_quant)
    prefix = f"{name}.weight."
    stats = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    if weight.dtype != torch.uint8:
        raise FANformerError(f"{file}: {name}.weight is {weight.dtype}, expected bitsandbytes' packed uint8 codes")
    with foreign_errors(f"{file}: the 4-bit state of {name} cannot be read; the checkpoint is damaged"):
        module.weight = bnb.nn.Params4bit.from_prequantized(weight, stats, requires_grad=False, device="cpu",
                                                            module=module)
    if tuple(module.weight.quant_state.shape) != shape:
        raise FANformerError(f"{file}: {name} holds a 4-bit weight of shape "
                             f"{tuple(module.weight.quant_state.shape)}, config.json implies {shape}")
    _check_nf4_state(f"{file}: {name}", weight, module.weight.quant_state)
    return module


def _check_nf4_state(where: str, weight: torch.Tensor, state) -> None:
    """bnb's kernels index the packed codes and the block scales by the weight's shape alone:
    each must hold exactly what that shape needs, or dequantizing reads past its end."""
    n = state.shape[0] * state.shape[1]
    blocksize = state.blocksize if isinstance(state.blocksize, int) else 0
    if blocksize <= 0 or weight.numel() != -(-n // 2):
        raise FANformerError(f"{where}: {weight.numel()} bytes of 4-bit codes with blocksize {state.blocksize!r}; "
                             f"a {tuple(state.shape)} weight needs {-(-n // 2)} and a positive blocksize")
    nested = [("absmax", state.absmax, -(-n // blocksize), 1), ("quant_map", state.code, 16, 1)]
    if state.state2 is not None:  # double quantization: the absmax themselves in 8-bit blocks
        inner = state.state2
        if not isinstance(inner.blocksize, int) or inner.blocksize <= 0:
            raise FANformerError(f"{where}: the nested blocksize is {inner.blocksize!r}")
        nested += [("nested_absmax", inner.absmax, -(-state.absmax.numel() // inner.blocksize), 1),
                   ("nested_quant_map", inner.code, 256, 1)]
    for key, tensor, count, _ in nested:
        if tensor.numel() != count:
            raise FANformerError(f"{where}.weight.{key} holds {tensor.numel()} values; the weight's shape needs {count}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FANformerError(f"{where}.weight.{key} holds NaN or infinite values; the checkpoint is damaged")
    if not (isinstance(state.dtype, torch.dtype) and state.dtype.is_floating_point):
        raise FANformerError(f"{where}: the 4-bit state's compute dtype is {state.dtype!r}, not a float type")


def load_bnb_model(path: Path, qconfig: dict, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a bitsandbytes checkpoint: the float structure with bnb modules holding the
    saved int8 / NF4 tensors as they are (nothing is dequantized)."""
    from fanformer.checkpoint import WEIGHTS_FILE, load_config, load_safetensors, load_state
    from fanformer.model import FANformer

    config = config_from_quantization_config(qconfig, path)
    with torch.device("meta"):
        model = FANformer(load_config(path))
    state = load_safetensors(path / WEIGHTS_FILE)
    suffix = ".SCB" if isinstance(config, BnbInt8Config) else "." + NF4_STATE
    for name in sorted(key[:-len(suffix)] for key in state if key.endswith(suffix)):
        layer = stored_linear(model, name, path / WEIGHTS_FILE, name)
        module = _loaded_module(name, layer, state, config, path / WEIGHTS_FILE)
        set_module(model, name, module)
        # load_state assigns each tensor of `state` as the module's parameter: give it bnb's
        # own parameter object (which carries SCB / the 4-bit quant_state), not the raw tensor.
        state[f"{name}.weight"] = module.weight
    return load_state(model, state, path, device)  # in eval mode: LLM.int8()'s int8 path, not bnb's training one


@register(BnbInt8Config)
@register(BnbNF4Config)
def bnb_handler(model, layers, config: BnbConfig, calibration, progress):
    """`quantize`'s handler for bitsandbytes int8 and nf4: it swaps in bnb's own modules."""
    return bnb_quantize(model, layers, config, progress)
