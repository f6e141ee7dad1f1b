"""Exporters: one entry point, `export(checkpoint, format, out, **options)`, and a
registry of formats, so a new format is one new module and one line below."""

from __future__ import annotations

from pathlib import Path

from fanformer.errors import FANformerError


def _onnx(checkpoint, out, **options):
    from export.onnx_export import export_onnx

    return export_onnx(checkpoint, out, **options)


def _gguf(checkpoint, out, **options):
    from export.gguf_export import export_gguf

    return export_gguf(checkpoint, out, **options)


EXPORTERS = {"onnx": _onnx, "gguf": _gguf}


def default_output(checkpoint: str | Path, format: str, **options) -> Path:
    """Beside the checkpoint: the file `<checkpoint>[-llama]-<type>.gguf` for GGUF (`-llama`
    for --arch llama only; a quantized checkpoint's type is the one it is carried into), else the folder `<checkpoint>-<format>[-<dtype>][-<quantize>][-bs<block size>]`."""
    checkpoint = Path(checkpoint)
    if format == "gguf":
        from export import gguf_format

        parts = [checkpoint.name] + (["llama"] if options.get("arch") == gguf_format.LLAMA_ARCH else [])
        parts.append(options.get("type") or carried_type_name(checkpoint) or gguf_format.DEFAULT_WEIGHT_TYPE)
        return checkpoint.with_name("-".join(parts) + gguf_format.FILE_SUFFIX)
    parts = [format] + [str(options[k]) for k in ("dtype", "quantize") if options.get(k) not in (None, "fp32")]
    if options.get("block_size") is not None:
        parts.append(f"bs{options['block_size']}")
    return checkpoint.with_name(f"{checkpoint.name}-{'-'.join(parts)}")


def carried_type_name(checkpoint: Path) -> str | None:
    """The GGUF type a quantized checkpoint is carried into ("q4_0", ...), None for a float one."""
    from fanformer.checkpoint import read_quantization_config

    quantization = read_quantization_config(checkpoint)
    if quantization is None:
        return None
    from export.gguf_carry import target_type

    return target_type(quantization["bits"], quantization["sym"]).name.lower()


def refuse_bitsandbytes(checkpoint: str | Path, format: str) -> None:
    """ONNX and GGUF carry a quantized checkpoint's GPTQ-layout integers only; bnb's int8
    rows and NF4 codes have no counterpart there."""
    from fanformer.checkpoint import read_quantization_config
    from quant.checkpoint import describe
    from quant.config import BNB_QUANT_METHOD

    quantization = read_quantization_config(checkpoint)
    if quantization is not None and quantization.get("quant_method") == BNB_QUANT_METHOD:
        raise FANformerError(f"{checkpoint} holds {describe(quantization)} weights, which {format.upper()} cannot "
                             "carry (only rtn/gptq/awq checkpoints are carried); export the float checkpoint instead "
                             "(it can be quantized on export)")


def export(checkpoint: str | Path, format: str, out: str | Path | None = None, **options) -> Path:
    if format not in EXPORTERS:
        raise FANformerError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    refuse_bitsandbytes(checkpoint, format)
    return EXPORTERS[format](checkpoint, out or default_output(checkpoint, format, **options), **options)
