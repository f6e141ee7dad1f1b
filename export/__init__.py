"""Exporters: one entry point, `export(checkpoint, format, out, **options)`, over a registry.

A format registers itself from a module of this package whose name ends in `_format`
(`onnx_format.py`, `gguf_format.py`): its name, a one-line summary, an options dataclass
(its fields, with their `knob` help and choices, become `fanformer export` flags), its
default output path and its writer, which is imported only when an export runs. A new
format is one such module. `formats()` imports them once.

Nothing here runs a model: checking an export is the runtime's job, so `export` takes the
check as a callback (`validate`; `fanformer.runtime.validation.VALIDATORS`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fanformer.errors import FANformerError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    summary: str  # one line, for --help
    options: type  # a dataclass validated in __post_init__; its fields are the format's flags
    default_output: Callable[[Path, Any], Path]  # (checkpoint, options) -> a path beside the checkpoint
    # (checkpoint, out, options, force, validate) -> out; imports the heavy writer when called.
    write: Callable[..., Path]


FORMATS: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, ExportFormat]:
    """Every registered format, importing this package's `*_format` modules the first time."""
    for module in pkgutil.iter_modules(__path__):
        if module.name.endswith("_format"):
            importlib.import_module(f"{__name__}.{module.name}")
    return FORMATS


def get_format(name: str) -> ExportFormat:
    known = formats()
    if name not in known:
        raise FANformerError(f"unknown export format {name!r}; choose one of {', '.join(known)}")
    return known[name]


def make_options(fmt: ExportFormat, **options) -> Any:
    """The format's options dataclass from keyword options, refusing names it does not have."""
    names = {f.name for f in dataclasses.fields(fmt.options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise FANformerError(f"{', '.join(unknown)} do not apply to {fmt.name}; "
                             f"its options are {', '.join(sorted(names))}")
    return fmt.options(**options)


def default_output(checkpoint: str | Path, format: str, **options) -> Path:
    fmt = get_format(format)
    return fmt.default_output(Path(checkpoint), make_options(fmt, **options))


def refuse_uncarried(checkpoint: str | Path, format: str) -> None:
    """ONNX and GGUF carry a quantized checkpoint's GPTQ-layout integers, and GGUF a K-grid
    checkpoint's llama.cpp blocks; bnb's int8 rows and NF4 codes have no counterpart in
    either, nor llama.cpp's blocks in ONNX."""
    from fanformer.checkpoint import read_quantization_config
    from fanformer.quant.config import BNB_QUANT_METHOD, GGML_CHECKPOINT_FORMAT, describe

    quantization = read_quantization_config(checkpoint)
    if quantization is None:
        return
    if quantization.get("quant_method") == BNB_QUANT_METHOD:
        raise FANformerError(f"{checkpoint} holds {describe(quantization)} weights, which {format.upper()} cannot "
                             "carry (only rtn/gptq/awq checkpoints are carried); export the float checkpoint instead "
                             "(it can be quantized on export)")
    if quantization.get("checkpoint_format") == GGML_CHECKPOINT_FORMAT and format != "gguf":
        raise FANformerError(f"{checkpoint} holds llama.cpp blocks ({describe(quantization)}), which only GGUF "
                             f"carries; export it with --format gguf, or export its float checkpoint to {format}")


def export(checkpoint: str | Path, format: str, out: str | Path | None = None, *, force: bool = False,
           validate: Callable[[Path, Path, str], object] | None = None, **options) -> Path:
    """Write `checkpoint` in `format` to `out` (default: `default_output`); `validate` checks
    the finished output before it is moved into place (see the format's writer)."""
    fmt = get_format(format)
    opts = make_options(fmt, **options)
    refuse_uncarried(checkpoint, format)
    out = Path(out) if out is not None else fmt.default_output(Path(checkpoint), opts)
    return fmt.write(Path(checkpoint), out, opts, force=force, validate=validate)
