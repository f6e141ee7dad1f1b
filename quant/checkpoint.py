"""Quantized checkpoint directories: the float checkpoint's layout plus the GPTQ tensors.

    config.json           the model config + "quantization_config": {quant_method, bits, group_size,
                          sym, desc_act, checkpoint_format "gptq", version, ...} (Hugging Face's keys)
    model.safetensors     per quantized linear `<name>.qweight/.qzeros/.scales/.g_idx` (+ `.bias`),
                          in the GPTQ v1 layout of `quant/packing.py`; every other tensor in float
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), generation_config.json
    quant_report.json     per-layer reconstruction error (GPTQ's loss, AWQ's output error and scale search, RTN's weight MSE)

A GPTQ checkpoint on a llama.cpp K-quant grid (`--grid q4_k_m`, quant/gptq_k.py) has the
same files; its quantization_config says checkpoint_format "ggml", the grid (the GGUF
mixture) and per quantized linear its ggml type ("tensor_types"), and model.safetensors
holds per such linear `<name>.qblocks` (uint8, (out, row bytes): the GGUF tensor's bytes).

A bitsandbytes checkpoint (int8 / nf4, quant/bnb.py) has the same files; its
quantization_config holds transformers' BitsAndBytesConfig keys (quant_method
"bitsandbytes", load_in_8bit / load_in_4bit, ...) and model.safetensors bnb's own tensors
(`<name>.weight` int8 + `.SCB`, or `<name>.weight` packed 4-bit + `.weight.absmax`, ...).

Nothing is pickled. Which layers are quantized is read from the tensor names, so a layer
left in float (`--keep`) needs no bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from fanformer.checkpoint import (QUANTIZATION_KEY, WEIGHTS_FILE, check_output_dir, load_config, load_model,
                                  load_safetensors, load_state, read_quantization_config, save_checkpoint)
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.tokenizer import load_tokenizer
from fanformer.quant.config import (BNB_QUANT_METHOD, GGML_CHECKPOINT_FORMAT, K_GRIDS, BnbConfig, CalibratedConfig,
                                    GPTQConfig, WeightOnlyConfig, describe)
from fanformer.quant.linear import GGMLLinear, QuantLinear, set_module, stored_linear
from fanformer.quant.packing import BITS, CHECKPOINT_FORMAT

REPORT_FILE = "quant_report.json"
FORMAT_VERSION = 1  # this project's quantized-checkpoint layout; bump on an incompatible change


def quantization_config(config: WeightOnlyConfig) -> dict:
    """config.json's quantization_config, in the keys transformers/GPTQModel use."""
    return {"quant_method": config.method, "bits": config.bits, "group_size": config.group_size,
            "sym": config.sym, "desc_act": getattr(config, "act_order", False),
            "checkpoint_format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION,
            **({"damp_percent": config.percdamp, "true_sequential": False} if isinstance(config, GPTQConfig) else {}),
            "lm_head": config.lm_head, "keep": list(config.keep)}


def ggml_quantization_config(config: GPTQConfig, model: FANformer) -> dict:
    """config.json's quantization_config of a K-grid GPTQ checkpoint: the grid and each
    GGMLLinear's ggml type, by layer name."""
    return {"quant_method": config.method, "checkpoint_format": GGML_CHECKPOINT_FORMAT, "grid": config.grid,
            "version": FORMAT_VERSION, "damp_percent": config.percdamp, "lm_head": config.lm_head,
            "keep": list(config.keep),
            "tensor_types": {name: m.qtype.name.lower() for name, m in model.named_modules()
                             if isinstance(m, GGMLLinear)}}


def save_quantized(out: str | Path, model: FANformer, tokenizer, config: WeightOnlyConfig, report: dict) -> Path:
    """A bitsandbytes config saves bnb's own tensors (quant/bnb.py), a K grid llama.cpp's
    blocks; the others the GPTQ layout."""
    if isinstance(config, GPTQConfig) and config.own_modules:
        qconfig = ggml_quantization_config(config, model)
    elif isinstance(config, BnbConfig):
        from fanformer.quant.bnb import quantization_config as bnb_quantization_config

        qconfig = bnb_quantization_config(config, report["kept"])
    else:
        qconfig = quantization_config(config)
    return save_checkpoint(out, model, tokenizer, config_extra={QUANTIZATION_KEY: qconfig},
                           extra_files={REPORT_FILE: json.dumps(report, indent=2)})


def load_quantized_model(path: str | Path, device: str | torch.device = "cpu") -> FANformer:
    """Rebuild a quantized model: the float structure with `QuantLinear`s where the
    checkpoint holds packed weights; the packed tensors stay packed in memory."""
    path = Path(path)
    config = load_config(path)
    qconfig = read_quantization_config(path)
    if qconfig is None:
        raise FANformerError(f"{path} is not a quantized checkpoint (no {QUANTIZATION_KEY} in config.json)")
    if qconfig.get("quant_method") == BNB_QUANT_METHOD:  # int8 / nf4 in bnb's modules, kept as saved
        from fanformer.quant.bnb import load_bnb_model

        return load_bnb_model(path, qconfig, device)
    if qconfig.get("checkpoint_format") == GGML_CHECKPOINT_FORMAT:
        return load_ggml_model(path, qconfig, config, device)
    fmt, bits, group_size = qconfig.get("checkpoint_format"), qconfig.get("bits"), qconfig.get("group_size")
    if fmt != CHECKPOINT_FORMAT or bits not in BITS or not isinstance(group_size, int) or isinstance(group_size, bool):
        raise FANformerError(f"{path}: unsupported {QUANTIZATION_KEY} (checkpoint_format {fmt!r}, bits {bits!r}, "
                             f"group_size {group_size!r}); expected the GPTQ v1 layout this tool writes")
    if group_size != -1 and group_size <= 0:
        raise FANformerError(f"{path}: {QUANTIZATION_KEY}.group_size is {group_size}; it must be positive, "
                             "or -1 for one group per row")
    with torch.device("meta"):
        model = FANformer(config)
    state = load_safetensors(path / WEIGHTS_FILE)
    quantized = sorted({key.rsplit(".", 1)[0] for key in state if key.endswith(".qweight")})
    for name in quantized:
        layer = stored_linear(model, name, path / WEIGHTS_FILE, f"{name}.qweight")
        if group_size != -1 and layer.in_features % group_size:
            raise FANformerError(f"{path}: {QUANTIZATION_KEY}.group_size {group_size} does not divide {name}'s "
                                 f"{layer.in_features} inputs; the config is damaged")
        set_module(model, name, QuantLinear(layer.in_features, layer.out_features, bits, group_size,
                                            bias=layer.bias is not None, device="meta"))
    model = load_state(model, state, path, device)
    for name in quantized:  # g_idx indexes the groups: out of range it would read past scales/qzeros
        layer = model.get_submodule(name)
        groups = layer.scales.shape[0]
        if layer.g_idx.numel() and not 0 <= int(layer.g_idx.min()) <= int(layer.g_idx.max()) < groups:
            raise FANformerError(f"{path / WEIGHTS_FILE}: tensor {name}.g_idx holds group indices "
                                 f"{int(layer.g_idx.min())}..{int(layer.g_idx.max())}, outside 0..{groups - 1}")
    return model


# The ggml types a K-grid checkpoint may hold: those llama.cpp's Q4_K mixtures and their
# row-length fallbacks give a 2-D weight.
GGML_TYPES = {t.name.lower(): t for t in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
                                          GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_0,
                                          GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
                                          GGMLQuantizationType.F16)}


def load_ggml_model(path: Path, qconfig: dict, config, device: str | torch.device) -> FANformer:
    """A K-grid GPTQ checkpoint: `GGMLLinear`s where tensor_types names a layer, each checked
    (name, type, and through load_state the blocks' shape) before anything is read, then
    dequantized once and checked finite."""
    grid, types = qconfig.get("grid"), qconfig.get("tensor_types")
    if grid not in K_GRIDS or not isinstance(types, dict) or not types:
        raise FANformerError(f"{path}: {QUANTIZATION_KEY} of a ggml checkpoint needs a grid ({', '.join(K_GRIDS)}) "
                             f"and tensor_types {{layer: type}}, got grid {grid!r} and tensor_types "
                             f"{type(types).__name__}; the config is damaged")
    with torch.device("meta"):
        model = FANformer(config)
    state = load_safetensors(path / WEIGHTS_FILE)
    stored = sorted(key[: -len(".qblocks")] for key in state if key.endswith(".qblocks"))
    if stored != sorted(types):
        raise FANformerError(f"{path}: {QUANTIZATION_KEY}.tensor_types names {len(types)} layers, "
                             f"{WEIGHTS_FILE} holds blocks for {len(stored)}; the checkpoint is damaged")
    for name, type_name in types.items():
        if not isinstance(type_name, str) or type_name not in GGML_TYPES:
            raise FANformerError(f"{path}: {name} has ggml type {type_name!r}; a {grid} checkpoint holds "
                                 f"{', '.join(GGML_TYPES)}")
        layer = stored_linear(model, name, path / WEIGHTS_FILE, f"{name}.qblocks")
        try:
            module = GGMLLinear(layer.in_features, layer.out_features, GGML_TYPES[type_name],
                                bias=layer.bias is not None, device="meta")
        except FANformerError as e:
            raise FANformerError(f"{path}: {name}: {e}; the checkpoint is damaged") from None
        set_module(model, name, module)
    model = load_state(model, state, path, device)
    for name in types:  # the blocks' fp16 scales can hold NaN/inf: name the layer now, not at generation
        module = model.get_submodule(name)
        weight = module.dequantized_weight()
        if not torch.isfinite(weight).all():
            raise FANformerError(f"{path / WEIGHTS_FILE}: {name}.qblocks dequantize to non-finite weights "
                                 "(damaged block scales); the checkpoint is damaged")
        module._weight = weight.to(module.qblocks.device)  # what the first forward would make
    return model


def load_any_model(path: str | Path, device: str | torch.device = "cpu") -> FANformer:
    """The model of a float or a quantized checkpoint (whose layers stay quantized): the one
    place that asks which one a checkpoint is."""
    if read_quantization_config(path) is None:
        return load_model(path).to(device)
    return load_quantized_model(path, device)


def load_float_for_quantization(path: str | Path) -> tuple[FANformer, object]:
    """The float model and tokenizer to quantize; a quantized checkpoint is refused."""
    qconfig = read_quantization_config(path)
    if qconfig is not None:
        raise FANformerError(f"{path} is already quantized ({describe(qconfig)}); "
                             "quantize its float checkpoint instead")
    return load_model(path), load_tokenizer(path)


def quantize_checkpoint(checkpoint: str | Path, config: WeightOnlyConfig, out: str | Path, force: bool = False,
                        calib_data: list[str] | None = None, cache_dir: str | Path | None = None,
                        progress: bool = True) -> dict:
    """Checkpoint directory in, quantized checkpoint directory out; returns the report."""
    from fanformer.quant import quantize
    from fanformer.quant.calibration import calibration_tokens

    out = check_output_dir(out, force)
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise FANformerError("--out must differ from the checkpoint being quantized")
    model, tokenizer = load_float_for_quantization(checkpoint)
    calibration = None
    if isinstance(config, CalibratedConfig):
        config = config.for_model(model.config.max_seq_len)
        if config.calib_seq_len > model.config.max_seq_len:
            raise FANformerError(f"--calib-seq-len {config.calib_seq_len} exceeds the model's max_seq_len "
                                 f"{model.config.max_seq_len}")
        calibration = calibration_tokens(tokenizer, calib_data, config.calib_samples, config.calib_seq_len,
                                         config.seed, cache_dir)
    report = quantize(model, config, calibration, progress=progress)
    report["checkpoint"] = str(checkpoint)
    save_quantized(out, model, tokenizer, config, report)
    return report
