"""ONNX export of a FANformer checkpoint: a decoder with KV cache in Optimum's layout,
plus the files onnxruntime-genai needs to run the folder on its own.

The graph comes from `torch.onnx.export(dynamo=True)` over a thin wrapper whose cache
concatenates the past_key_values.* inputs with the new keys and values and hands the
result back as present.* outputs; everything else is `fanformer.model` unchanged, so
FAN, HybridNorm, CoLA, GQA and gated residuals export with no special cases. No
maintained exporter (Optimum, onnxruntime-genai's model builder) knows this
architecture, hence this module. After writing, the folder is validated as Optimum
does: onnxruntime against PyTorch on a prefill and two decode steps, batch 1 and 2.
A quantized export (export/onnx_quant.py) is quantized in the temporary folder before
that validation, against a tolerance of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from fanformer.export import onnx_format as names
from fanformer.export import onnx_carry, onnx_fused, onnx_quant
from fanformer.checkpoint import (CONFIG_FILE, GENERATION_CONFIG_FILE, check_output_dir, load_model,
                                  load_generation_config, read_quantization_config)
from fanformer.errors import FANformerError
from fanformer.outputs import write_directory_atomically
from fanformer.model import FANformer
from fanformer.tokenizer import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, special_token_ids

log = logging.getLogger(__name__)
# Without torchvision the exporter warns that it skips torchvision's ops, which we never use.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class _ExportCache:
    """The KV cache as graph inputs and outputs: `update` concatenates and records."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = past
        self.present: list[torch.Tensor] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[2 * layer_idx].shape[2]

    def update(self, key, value, layer_idx, cache_kwargs=None):
        key = torch.cat([self.past[2 * layer_idx], key], dim=2)
        value = torch.cat([self.past[2 * layer_idx + 1], value], dim=2)
        self.present += [key, value]
        return key, value


class DecoderWithPast(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: FANformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = _ExportCache(list(past))
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        return (logits, *cache.present)


def example_inputs(model: FANformer, dtype: torch.dtype, batch: int = 2, new: int = 3, past: int = 4):
    """Sizes other than 0 and 1 so that torch.export keeps every axis symbolic."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new)
    kv = tuple(torch.zeros(batch, c.n_kv_heads, past, c.head_dim, dtype=dtype) for _ in range(2 * c.n_layers))
    return ids, mask, positions, kv


def export_graph(model: FANformer, path: Path, dtype: str = "fp32", opset: int = names.OPSET) -> None:
    """Write the decoder graph (and external weights when over 2 GB) to `path`."""
    model = model.to(DTYPES[dtype]).eval()
    batch, seq = torch.export.Dim(names.BATCH), torch.export.Dim(names.SEQUENCE)
    past, total = torch.export.Dim(names.PAST_SEQUENCE), torch.export.Dim(names.TOTAL_SEQUENCE)
    kv_axes = tuple({0: batch, 2: past} for _ in range(2 * model.config.n_layers))
    n = model.config.n_layers
    # The exporter and its graph optimizer narrate every pass on stdout/stderr and warn
    # about internals; keep that out of the user's terminal unless export fails.
    chatter = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                DecoderWithPast(model).eval(), example_inputs(model, DTYPES[dtype]), dynamo=True,
                opset_version=opset, input_names=names.input_names(n), output_names=names.output_names(n),
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv_axes),
                verbose=False)
            # Drop the exporter's per-node debug annotations (FX node text, module stack):
            # they are ~0.5 MB of a small model's file and no runtime reads them.
            for node in program.model.graph.all_nodes():
                node.metadata_props.clear()
            program.save(str(path))
    except Exception:
        log.error("torch.onnx.export output:\n%s", chatter.getvalue()[-5000:])
        raise


def genai_config(model: FANformer, special: dict[str, int], generation: dict, fused: bool) -> dict:
    """onnxruntime-genai's genai_config.json for the exported decoder."""
    c = model.config
    inputs = {"input_ids": names.INPUT_IDS, "attention_mask": names.ATTENTION_MASK,
              "past_key_names": names.PAST_KEY, "past_value_names": names.PAST_VALUE}
    if not fused:  # GroupQueryAttention rotates by cache slot: the fused graph takes no positions
        inputs["position_ids"] = names.POSITION_IDS
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
            "pad_token_id": special["pad_token_id"], "vocab_size": c.vocab_size, "context_length": c.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": names.MODEL_FILE, "head_size": c.head_dim, "hidden_size": c.d_model,
                "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
                "num_hidden_layers": c.n_layers,
                "inputs": inputs,
                "outputs": {"logits": names.LOGITS, "present_key_names": names.PRESENT_KEY,
                            "present_value_names": names.PRESENT_VALUE},
            },
        },
        "search": {
            "do_sample": bool(generation.get("do_sample", False)), "num_beams": 1, "num_return_sequences": 1,
            "max_length": c.max_seq_len, "min_length": 0, "temperature": generation.get("temperature", 1.0),
            "top_k": generation.get("top_k", 50), "top_p": generation.get("top_p", 1.0),
            "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "early_stopping": True,
            # The fused graph's GroupQueryAttention writes new keys and values into the past
            # buffer in place (genai preallocates it at max_length); the plain graph
            # concatenates, so its present is a new, longer tensor each step.
            "past_present_share_buffer": fused,
        },
    }


def export_onnx(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", quantize: str | None = None,
                block_size: int | None = None, optimize: bool = True, accuracy_level: int | None = None,
                force: bool = False, validate: Callable[[Path, Path, str], object] | None = None) -> Path:
    """Export `checkpoint` to the folder `out` (written under a temporary name, then renamed),
    optionally quantized (`quantize`: int8, int4 or int8-wo; see export/onnx_quant.py).

    With `optimize` (the default) the graph is export/onnx_fused.py's, built from
    onnxruntime's contrib ops, wherever the model has one (not for the FFTNet mixer or the
    Fourier head, which export the plain graph with a warning); otherwise the plain graph
    of standard ONNX ops from torch.onnx. `accuracy_level` is MatMulNBits' (int4, int8-wo and
    carried weights; default 4 in fp32, 0 in fp16), recorded in model.onnx's metadata.

    `validate(checkpoint, folder, kind)` runs on the finished folder before it is renamed
    into place and raises to refuse it; `kind` names the variant for its tolerance
    (`variant_kind`). The runtime provides one (`fanformer.runtime.validation.validate_onnx`);
    the exporter itself runs no model."""
    checkpoint, out = Path(checkpoint), Path(out)
    names.OnnxOptions(dtype=dtype, quantize=quantize, block_size=block_size, optimize=optimize,
                      accuracy_level=accuracy_level)  # checks them together
    qconfig = read_quantization_config(checkpoint)
    carried = {}
    if qconfig is not None:
        # A quantized checkpoint: its integers go into MatMulNBits as they are (export/onnx_carry.py).
        if quantize is not None:
            raise FANformerError(f"{checkpoint} is already quantized ({qconfig.get('quant_method')} "
                                 f"{qconfig.get('bits')}-bit); its integers are exported as they are, so "
                                 "--quantize does not apply (export its float checkpoint to requantize)")
        if dtype != "fp32":
            raise FANformerError("a quantized checkpoint exports with --dtype fp32 only (float activations, "
                                 "MatMulNBits weights)")
        onnx_carry.check_carry(qconfig)
    elif accuracy_level is not None and quantize is None:
        raise FANformerError(names.ACCURACY_LEVEL_APPLIES)
    check_output_dir(out, force)
    if qconfig is not None:
        from fanformer.quant.checkpoint import load_quantized_model
        from fanformer.quant.linear import dequantized_model

        model, carried = dequantized_model(load_quantized_model(checkpoint))
        for layer in carried.values():  # refuse before exporting anything
            onnx_carry.layer_integers(layer)
    else:
        model = load_model(checkpoint)
    from fanformer.tokenizer import load_tokenizer

    special = special_token_ids(load_tokenizer(checkpoint))
    generation = load_generation_config(checkpoint)
    fused = optimize and _fused_or_warn(model)
    weight_only = bool(carried) or quantize in ("int4", "int8-wo")
    if accuracy_level is None and weight_only:
        accuracy_level = names.DEFAULT_ACCURACY_LEVEL if dtype == "fp32" else 0
    kind = variant_kind(dtype, quantize, bool(carried), accuracy_level or 0)

    def write(tmp: Path) -> None:
        graph = names.FUSED if fused else names.PLAIN
        log.info("exporting %s to ONNX (%s graph, %s, opset %d)", checkpoint, graph, dtype, names.OPSET)
        if fused:
            onnx_fused.save(onnx_fused.build_fused(model, dtype, carried, accuracy_level or 0), tmp)
        else:
            export_graph(model, tmp / names.MODEL_FILE, dtype)
        if quantize:
            log.info("quantizing to %s%s", quantize, f" (accuracy level {accuracy_level})" if weight_only else "")
            onnx_quant.quantize_onnx(tmp, quantize, block_size, accuracy_level)
        if carried and not fused:
            if (tmp / names.DATA_FILE).is_file():
                raise FANformerError("carrying a quantized checkpoint into ONNX supports models under 2 GB only")
            count = onnx_carry.carry_into(tmp / names.MODEL_FILE, carried, accuracy_level or 0)
            log.info("carried %d quantized layers into %d MatMulNBits nodes (%d-bit)", len(carried), count,
                     qconfig["bits"])
        _record(tmp, {names.META_GRAPH: graph, names.META_ACCURACY_LEVEL: str(accuracy_level or 0)})
        for name in (CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                     SPECIAL_TOKENS_MAP_FILE):
            if (checkpoint / name).is_file():
                shutil.copy(checkpoint / name, tmp / name)
        (tmp / names.GENAI_CONFIG_FILE).write_text(
            json.dumps(genai_config(model, special, generation, fused), indent=2))
        if validate is not None:
            validate(checkpoint, tmp, kind)

    return write_directory_atomically(out, write)


def variant_kind(dtype: str, quantize: str | None, carried: bool, accuracy_level: int) -> str:
    """The name validation's tolerances are keyed by: the method or dtype, plus `-acc4` when
    MatMulNBits also quantizes activations (accuracy level 4)."""
    kind = "carried" if carried else quantize or dtype
    return f"{kind}-acc4" if accuracy_level == 4 and (carried or quantize in ("int4", "int8-wo")) else kind


def _fused_or_warn(model: FANformer) -> bool:
    reason = onnx_fused.unsupported(model)
    if reason:
        log.warning("exporting the plain ONNX graph: %s", reason)
    return reason is None


def _record(folder: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into model.onnx's metadata_props (the graph proto only: external
    weights, if any, stay where they are)."""
    path = folder / names.MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **metadata})
    onnx.save(model, str(path))
