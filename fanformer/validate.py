"""Checking a file before trusting it: every loader reads untrusted input (a download, a
damaged disk, a hand-edited config), so sizes, counts and dtypes are compared with the file
itself before anything is allocated, and every third-party parser's failure becomes one
`FANformerError` naming the file, the field and the problem.

The bounds follow from the file: a model cannot have more layers than the weights file has
blocks, nor more weights than the file has bytes; the one bound that no file implies (the
context length, which sizes the KV cache) is checked against the memory this process may use.
"""

from __future__ import annotations

import json
import os
import re
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from fanformer.errors import FANformerError

# safetensors' dtype names -> torch dtypes (the ones this project writes or reads).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def read_json(path: str | Path, kind: type = dict):
    """A JSON file's content, of type `kind`, or one FANformerError saying what is wrong:
    unreadable, not UTF-8, not JSON (with the parser's line and column), nested too deep
    for the parser (RecursionError), or of another type."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FANformerError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                             "the file is corrupted") from None
    except OSError as err:
        raise FANformerError(f"{path} cannot be read ({err.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FANformerError(f"{path} is not valid JSON ({err}); the file is corrupted") from None
    except RecursionError:
        raise FANformerError(f"{path} nests its JSON too deeply to read; the file is corrupted") from None
    if not isinstance(data, kind):
        raise FANformerError(f"{path} holds a JSON {type(data).__name__}, expected a {kind.__name__}")
    return data


def safetensors_inventory(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header alone (no tensor is read).
    The safetensors library itself checks that the offsets lie within the file."""
    with foreign_errors(f"{path} is corrupted or truncated; re-create it from a good copy"):
        with safe_open(str(path), framework="pt") as f:
            inventory = {}
            for name in f.keys():
                tensor = f.get_slice(name)
                dtype = tensor.get_dtype()
                if dtype not in SAFETENSORS_DTYPES:
                    raise FANformerError(f"{path}: tensor {name} has dtype {dtype}, which no FANformer stores")
                inventory[name] = (SAFETENSORS_DTYPES[dtype], tuple(tensor.get_shape()))
            return inventory


def check_block_count(n_layers: int, names, path: Path, pattern: re.Pattern = _BLOCK, field: str = "n_layers") -> None:
    """The config's layer count against the blocks the weights file holds, before a model of
    that many layers is built: a config cannot ask for more layers than the file has."""
    indices = {int(m.group(1)) for name in names if (m := pattern.match(name))}
    if indices != set(range(n_layers)):
        held = f"blocks 0..{max(indices)}" if indices else "no blocks"
        raise FANformerError(f"{path}: {field} is {n_layers}, but the weights file holds {held} "
                             f"({len(indices)} distinct); the config and the weights disagree")


def check_dtype(name: str, dtype: torch.dtype, expected: torch.dtype, path: Path) -> None:
    """A stored tensor's dtype against the one the model holds there: any float type for a
    float weight (loading casts it), exactly the integer type for packed/index tensors."""
    ok = dtype.is_floating_point if expected.is_floating_point else dtype == expected
    if not ok:
        want = "a float type" if expected.is_floating_point else str(expected).removeprefix("torch.")
        raise FANformerError(f"{path}: tensor {name} is {str(dtype).removeprefix('torch.')}, expected {want}; "
                             "the file is damaged or not from this tool")


def check_finite(name: str, tensor: torch.Tensor, path: Path | str) -> None:
    """A float tensor with NaN or inf would give garbage text (greedy) or a sampling crash:
    refuse it at load, naming it. One reduction per tensor, cheap next to reading it."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FANformerError(f"{path}: tensor {name} holds {bad} NaN or infinite values; "
                             "the weights are damaged (or training diverged): use another checkpoint")


def memory_budget() -> int:
    """Bytes this process may hold: physical memory, or its address-space limit if lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return physical if soft == resource.RLIM_INFINITY else min(physical, soft)


def check_context_fits(n_layers: int, n_kv_heads: int, head_dim: int, max_seq_len: int, bytes_per_value: int,
                       path: Path | str, what: str = "max_seq_len") -> None:
    """A KV cache sized for the whole context (ggml's, genai's) must fit in memory; a config
    with max_seq_len in the billions would otherwise allocate until the process dies."""
    need = 2 * n_layers * n_kv_heads * head_dim * max_seq_len * bytes_per_value
    if need > memory_budget():
        raise FANformerError(f"{path}: {what} {max_seq_len:,} needs a {need / 2**30:,.1f} GiB KV cache, more than "
                             f"this process may use ({memory_budget() / 2**30:,.1f} GiB); the value is damaged "
                             "or the model too large for this machine")


def is_panic(err: BaseException) -> bool:
    """Whether `err` is pyo3's PanicException, which Rust libraries (tokenizers,
    safetensors) raise when their code panics. It derives from BaseException, so `except
    Exception` misses it, and its class (pyo3_runtime.PanicException) is created lazily and
    cannot be imported ahead of time: it is recognised by name."""
    return type(err).__name__ == "PanicException"


@contextmanager
def foreign_errors(what: str) -> Iterator[None]:
    """Turn a third-party library's failure inside the block into one FANformerError,
    "`what` failed (Type: first line)". MemoryError is left alone: it means a bound was
    missed, which the fuzz suite must see, not a file problem to report."""
    try:
        yield
    except (FANformerError, MemoryError):
        raise
    except Exception as err:
        raise FANformerError(f"{what} ({_describe(err)})") from None
    except BaseException as err:
        if not is_panic(err):
            raise
        raise FANformerError(f"{what} ({_describe(err)})") from None


def guarded(what: str, call: Callable, *args, **kwargs):
    """`call(*args, **kwargs)` under `foreign_errors(what)`: one line at a call site."""
    with foreign_errors(what):
        return call(*args, **kwargs)


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else 'no message'}"
