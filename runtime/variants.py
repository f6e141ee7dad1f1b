"""Every way this project can ship a trained checkpoint, as named, declarative variants:
what the drift table (runtime/drift_table.py) builds and measures.

A `Variant` says how to build its artifact into a work folder (a function of the
artifact it starts from: the float checkpoint, or another variant's artifact named by
`source`, so e.g. the GPTQ g32 checkpoint is built once and both measured itself and
carried into GGUF, and genai runs the very folder `onnx-fp32` exported), how to load it
(`load_backend` options), what it is (format, method, nominal weight bits) and what the
machine needs to run it (`requires`: a reason to skip, or None). Builds go through the
project's own entry points only: `quant.checkpoint.quantize_checkpoint` with the config
of a registered method (`quant.method_config`), `export.export` (checked by the runtime's
validator), and a cast of the checkpoint; a variant naming a method or format that is not
registered fails to build with the reason, which the table reports.

`bits` is the nominal width of the quantized weights (GGUF q4_0 stores 4.5 bits per
weight with its block scales, q4_1 5.0); the table's file size is what each costs on
disk. Adding a variant is one `_add(...)` line below.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fanformer.errors import FANformerError

Build = Callable[["BuildContext", Path, Path], None]  # (context, source artifact, out)


@dataclass(frozen=True)
class Variant:
    name: str
    format: str  # what ships: pytorch, onnx, gguf, genai
    method: str  # how the weights were made, in a few words
    bits: int  # nominal bits of the (quantized) weights
    artifact: str  # its file or folder name in the work folder
    build: Build | None  # None: the artifact is `source`'s own (nothing to build)
    source: str | None = None  # the variant whose artifact this one is built from; None: the checkpoint
    load: dict = field(default_factory=dict)  # load_backend options besides the device
    devices: tuple[str, ...] = ("cpu", "cuda")  # where its backend runs; elsewhere it runs on the CPU
    requires: Callable[[], str | None] = lambda: None  # why this machine cannot run it, or None

    def load_options(self, device: str, threads: int | None = None) -> dict:
        """`load_backend` keyword arguments on `device` (the table's), CPU if it cannot run
        there; `threads` reaches onnxruntime's, onnxruntime-genai's and ggml's own thread
        pools (torch's is process-wide)."""
        options = {"device": device if device in self.devices else "cpu", **self.load}
        if threads and self.format in ("onnx", "gguf", "genai"):
            options["threads"] = threads
        return options


# --- What a machine needs ----------------------------------------------------------

def importable(module: str, package: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install {package})"
        return None
    return check


def cuda_execution_provider() -> str | None:
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (ONNX fp16 on onnxruntime's CUDA execution provider)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (no CUDAExecutionProvider in this onnxruntime)"
    return None


# --- How artifacts are built ---------------------------------------------------------

@dataclass
class BuildContext:
    """Where and from what artifacts are built; each is built at most once per context.
    `data` is the corpus whose training split calibrates GPTQ/AWQ (the table scores its
    held-out split); `calib_samples` windows (None: the method's default)."""

    checkpoint: Path
    work: Path
    data: list[str] | None = None
    cache_dir: Path | None = None
    calib_samples: int | None = None
    progress: bool = False
    built: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)

    def artifact(self, name: str) -> Path:
        """The path of variant `name`'s artifact, building it (and its sources) if needed.
        A build that failed once fails again with the same error, without a second try."""
        if name in self.built:
            return self.built[name]
        if name in self.failed:
            raise self.failed[name]
        variant = VARIANTS[name]
        try:
            source = self.checkpoint if variant.source is None else self.artifact(variant.source)
            out = source
            if variant.build is not None:
                out = self.work / variant.artifact
                variant.build(self, source, out)
        except Exception as err:
            if variant.source is not None and variant.source in self.failed:
                err = FANformerError(f"its source {variant.source} failed to build: {err}")
            self.failed[name] = err
            raise err from None
        self.built[name] = out
        return out


def cast(dtype: str) -> Build:
    """The checkpoint's weights cast to `dtype` and saved as a checkpoint: what you ship
    to run the PyTorch model in half precision (half the bytes of fp32)."""

    def build(context: BuildContext, source: Path, out: Path) -> None:
        from fanformer.checkpoint import load_model, save_checkpoint
        from fanformer.tokenizer import load_tokenizer
        from fanformer.runtime.backend import resolve_dtype

        save_checkpoint(out, load_model(source, dtype=resolve_dtype(dtype)), load_tokenizer(source))

    return build


def quant_config(method: str, options: dict, context: BuildContext):
    """The registered method's config with `options`; methods that calibrate also get the
    context's number of calibration windows (their length is the config's default)."""
    from fanformer.quant import method_config, methods

    cls = methods().get(method)
    calibrates = cls is not None and any(f.name == "calib_samples" for f in dataclasses.fields(cls))
    calibration = {"calib_samples": context.calib_samples} if calibrates and context.calib_samples else {}
    return method_config(method, **options, **calibration)


def quantized(method: str, **options) -> Build:
    def build(context: BuildContext, source: Path, out: Path) -> None:
        from fanformer.quant.checkpoint import quantize_checkpoint

        quantize_checkpoint(source, quant_config(method, options, context), out, force=True,
                            calib_data=context.data, cache_dir=context.cache_dir, progress=context.progress)

    return build


def exported(format: str, **options) -> Build:
    def build(context: BuildContext, source: Path, out: Path) -> None:
        from fanformer.export import export
        from fanformer.runtime.validation import VALIDATORS

        export(source, format, out, force=True, validate=VALIDATORS.get(format), **options)

    return build


def imatrix_exported(type: str) -> Build:
    """The GGUF export quantized with the checkpoint's importance matrix, measured once per
    context on its calibration windows (export/gguf_imatrix.py)."""
    def build(context: BuildContext, source: Path, out: Path) -> None:
        from fanformer.export import export
        from fanformer.export.gguf_imatrix import make_imatrix

        imatrix = context.work / "importance.imatrix.gguf"
        if not imatrix.exists():
            make_imatrix(source, imatrix, context.data, context.calib_samples or 64, cache_dir=context.cache_dir,
                         progress=context.progress)
        export(source, "gguf", out, force=True, type=type, imatrix=str(imatrix))

    return build


# --- The registry ----------------------------------------------------------------------

VARIANTS: dict[str, Variant] = {}


def _add(name: str, format: str, method: str, bits: int, build: Build | None, artifact: str | None = None,
         **fields) -> None:
    VARIANTS[name] = Variant(name, format, method, bits, artifact or name, build, **fields)


BNB = importable("bitsandbytes", "bitsandbytes")
GENAI = importable("onnxruntime_genai", "onnxruntime-genai")
GGUF_FILE = "{}.gguf"
FAN_PROJECTION = "blocks.*.attn.fan.proj"  # a --keep pattern: the FAN layer's [W_p || W_g] (both CoLA factors, if any)
# ONNX, GGUF and genai files run on the CPU (the edge case; a CPU-only onnxruntime cannot do
# otherwise, and the GGUF backend is CPU-only); onnx-fp16-cuda is the GPU row.
CPU = ("cpu",)

_add("pytorch-fp16", "pytorch", "fp16 weights and compute", 16, cast("fp16"), load={"dtype": "fp16"})
_add("pytorch-bf16", "pytorch", "bf16 weights and compute", 16, cast("bf16"), load={"dtype": "bf16"})
_add("bnb-int8", "pytorch", "bitsandbytes LLM.int8()", 8, quantized("int8"), requires=BNB)
_add("bnb-nf4", "pytorch", "bitsandbytes NF4", 4, quantized("nf4"), requires=BNB)
_add("rtn-w4g128", "pytorch", "RTN, groups of 128", 4, quantized("rtn", bits=4, group_size=128))
_add("gptq-w4g128", "pytorch", "GPTQ, groups of 128", 4, quantized("gptq", bits=4, group_size=128))
_add("awq-w4g128", "pytorch", "AWQ, groups of 128", 4, quantized("awq", bits=4, group_size=128))
# The FAN projection is among the layers 4 bits hurt most (README, "Quantizing"): this row
# shows what keeping it float buys, beside the plain AWQ row.
_add("awq-w4g128-keep-fan", "pytorch", "AWQ, groups of 128, FAN projection kept float", 4,
     quantized("awq", bits=4, group_size=128, keep=(FAN_PROJECTION,)))
_add("gptq-w4g32", "pytorch", "GPTQ, groups of 32", 4, quantized("gptq", bits=4, group_size=32))
# GPTQ on Q4_K's grid, kept as llama.cpp's blocks (quant/gptq_k.py); gguf-q4_k_m-gptq carries them.
_add("gptq-q4_k_m", "pytorch", "GPTQ on Q4_K's grid, Q4_K_M mixture", 4, quantized("gptq", grid="q4_k_m", lm_head=True))
_add("onnx-fp32", "onnx", "fp32", 32, exported("onnx", dtype="fp32"), devices=CPU)
_add("onnx-fp16", "onnx", "fp16 weights and compute", 16, exported("onnx", dtype="fp16"), devices=CPU)
_add("onnx-int8", "onnx", "dynamic int8 (MatMulInteger)", 8, exported("onnx", quantize="int8"), devices=CPU)
_add("onnx-int4", "onnx", "MatMulNBits int4, blocks of 32, int8 activations (accuracy level 4)", 4,
     exported("onnx", quantize="int4"), devices=CPU)
# The export before the fused graph: standard ops, int4 with float activations (accuracy
# level 0). Against onnx-int4 it shows what the fused graph gains in speed and what level 4
# costs in drift (the two graphs compute the same logits to float rounding).
_add("onnx-int4-plain", "onnx", "MatMulNBits int4 with float activations, standard-op graph", 4,
     exported("onnx", quantize="int4", optimize=False, accuracy_level=0), devices=CPU)
# The legacy types as llama-quantize writes them: q5_0 / q4_0 / q4_1 with the LM head in Q6_K.
for _type, _bits, _method in (("f16", 16, "f16"), ("q8_0", 8, "q8_0"), ("q5_0", 5, "llama.cpp's Q5_0 mixture"),
                              ("q4_0", 4, "llama.cpp's Q4_0 mixture"), ("q4_1", 4, "llama.cpp's Q4_1 mixture")):
    _add(f"gguf-{_type}", "gguf", _method, _bits, exported("gguf", type=_type), GGUF_FILE.format(f"gguf-{_type}"),
         devices=CPU)
# llama.cpp's most shipped K-quant mixtures and 4-bit i-quant, plain and with an importance
# matrix (rows not in whole super-blocks of 256 fall back as llama.cpp's do: see the export log).
for _type, _bits in (("q6_k", 6), ("q4_k_m", 4), ("iq4_xs", 4)):
    _add(f"gguf-{_type}", "gguf", f"llama.cpp's {_type.upper()} mixture", _bits, exported("gguf", type=_type),
         GGUF_FILE.format(f"gguf-{_type}"), devices=CPU)
_add("gguf-q4_k_m-imatrix", "gguf", "Q4_K_M with an importance matrix", 4, imatrix_exported("q4_k_m"),
     GGUF_FILE.format("gguf-q4_k_m-imatrix"), devices=CPU)
_add("gguf-q4_k_m-gptq", "gguf", "GPTQ on Q4_K's grid carried into Q4_K_M", 4, exported("gguf"),
     GGUF_FILE.format("gguf-q4_k_m-gptq"), source="gptq-q4_k_m", devices=CPU)
_add("gptq-w4g32-gguf", "gguf", "GPTQ g32 carried into q4_0", 4, exported("gguf"), GGUF_FILE.format("gptq-w4g32"),
     source="gptq-w4g32", devices=CPU)
_add("gptq-w4g128-onnx", "onnx", "GPTQ g128 carried into MatMulNBits", 4, exported("onnx"), source="gptq-w4g128",
     devices=CPU)
_add("genai", "genai", "onnxruntime-genai on the onnx-fp32 folder", 32, None, source="onnx-fp32",
     load={"format": "genai"}, devices=CPU, requires=GENAI)
_add("onnx-fp16-cuda", "onnx", "fp16 on the CUDA execution provider", 16, None, source="onnx-fp16",
     load={"device": "cuda"}, requires=cuda_execution_provider)

# What `fanformer drift` measures unless told otherwise (gptq-w4g128-onnx only on request).
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name != "gptq-w4g128-onnx")


def check_names(names) -> tuple[str, ...]:
    """The names, validated: an unknown one is an error that lists the known ones."""
    names = tuple(names)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise FANformerError(f"unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(VARIANTS)}")
    if not names:
        raise FANformerError(f"no variants given; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise FANformerError(f"variant named twice in {', '.join(names)}")
    return names
