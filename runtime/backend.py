"""The one interface every form of the model runs behind, and the registry that picks one.

A backend owns a model and its tokenizer and runs forward steps over a KV cache that it
also owns: `prefill` the prompts, then `decode` one token per step. Generation,
perplexity, drift and the CLI only ever talk to this interface, so a new format (ONNX,
GGUF, a quantized checkpoint) is one new module, named `*_backend.py` in this package, that
subclasses `Backend` and registers itself with `@register`; `backends()` imports those
modules the first time a backend is looked up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fanformer.errors import FANformerError
from fanformer.validate import read_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BackendInfo:
    """What callers need to know about a loaded model, whatever its format."""

    format: str  # "pytorch", "onnx", "gguf", ...
    path: str
    vocab_size: int
    max_seq_len: int
    bos_id: int
    eos_id: int
    pad_id: int
    dtype: str  # the compute dtype, e.g. "fp32"
    device: str


class Backend(ABC):
    """A loaded model. Logits always come back as float32 torch tensors (B, T, vocab)."""

    info: BackendInfo
    tokenizer: object  # a `tokenizers.Tokenizer`
    # Sampling defaults shipped with the model (generation_config.json), in transformers' keys.
    generation_defaults: dict = {}

    @abstractmethod
    def new_cache(self, batch_size: int) -> object:
        """An empty KV cache for `batch_size` sequences (opaque to callers)."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: object | None) -> torch.Tensor:
        """Run `input_ids` (B, T) on top of what `cache` holds, append them to it, return
        logits (B, T, vocab). `attention_mask` (B, past + T) is 1 for real tokens and 0 for
        left padding. With `cache=None` the tokens are scored from scratch and nothing is kept."""

    def prefill(self, cache: object, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """`forward` on a prompt. With last_only the caller needs the last position's logits
        only, (B, 1, vocab), and a backend may skip computing the others (the LM head
        over a whole prompt is a third of a small model's prefill)."""
        logits = self.forward(input_ids, attention_mask, cache)
        return logits[:, -1:] if last_only else logits

    def decode(self, cache: object, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: token_ids (B, 1) -> logits (B, 1, vocab)."""
        return self.forward(token_ids, attention_mask, cache)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of unpadded windows, no cache: what perplexity needs."""
        return self.forward(input_ids, torch.ones_like(input_ids), None)

    # Batched serving (runtime/scheduler.py): sequences join a running batch and leave it
    # between decode steps, which needs a cache rebuilt from rows of other caches. A backend
    # that can do that sets `batching` and implements `join_caches`; the others are served
    # one sequence at a time, in order.
    batching: bool = False

    def join_caches(self, parts: list[tuple[object, list[int]]], length: int) -> object:
        """A new cache of `length` positions holding the listed rows of each (cache, rows)
        part, in order: each part's last positions (up to `length`) right-aligned, left
        padding before them that callers mask. The parts stay valid."""
        raise NotImplementedError(f"the {self.info.format} backend serves one sequence at a time")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    detect: Callable[[Path], bool]  # does this path look like this backend's format?
    load: Callable[..., Backend]


BACKENDS: dict[str, BackendSpec] = {}


def register(name: str, detect: Callable[[Path], bool]):
    """Class decorator: make a backend loadable by `load_backend` under `name`."""

    def wrap(cls):
        BACKENDS[name] = BackendSpec(name, detect, cls)
        return cls

    return wrap


def backends() -> dict[str, BackendSpec]:
    """Every registered backend, importing this package's `*_backend` modules the first time."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name.endswith("_backend"):
            importlib.import_module(f"{package}.{module.name}")
    return BACKENDS


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FANformerError(f"{path} does not exist; pass a checkpoint directory or a model file")
    for spec in backends().values():
        if spec.detect(path):
            return spec.name
    if path.is_dir() and (path / "config.json").is_file():
        read_json(path / "config.json")  # a damaged config.json: say what is wrong with it, not only "not a model"
    raise FANformerError(f"{path} is not a model this tool can run: expected one of "
                         f"{', '.join(BACKENDS)} (a checkpoint directory with config.json and model.safetensors, ...)")


def load_backend(path: str | Path, format: str | None = None, **options) -> Backend:
    """Load `path` with the backend for its format (detected unless `format` is given).

    Options every backend understands: `dtype` ("fp32", "fp16", "bf16") and `device`
    ("cpu", "cuda", "auto"); a backend refuses options it cannot honour.
    """
    name = format or detect_format(path)
    if name not in backends():
        raise FANformerError(f"unknown format {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name].load(Path(path), **options)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FANformerError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise FANformerError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise FANformerError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
