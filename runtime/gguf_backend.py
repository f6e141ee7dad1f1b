"""The GGUF backend: one .gguf file (weights, hyperparameters, tokenizer) run on the
file's own tensor types.

Format: GGUF v2/v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), read
memory-mapped with gguf-py's `GGUFReader`. Key and tensor names come from
export/gguf_format.py. Two architectures load: `fanformer` (every model option, under the
project's keys) and plain llama.cpp `llama` (p = 0, pre-norm, no CoLA, no gates, Q and K
rows in llama.cpp's interleaved RoPE layout). Every tensor's name, shape and type is
checked against the config before either engine builds anything.

Two engines run the file:

- `ggml` (the default where ggml-python imports): the forward as one ggml graph over the
  file's tensors, run by ggml's CPU kernels as llama.cpp runs its files
  (runtime/ggml_engine.py, runtime/ggml_graph.py). llama files keep their interleaved
  Q/K rows and run with ggml's interleaved RoPE.
- `torch` (the fallback, and the reference the ggml engine is tested against):
  `fanformer.model` with its linear layers swapped for ones that compute on the file's
  tensor types (runtime/gguf_layers.py, which says how each type is held and multiplied);
  a llama file's Q and K rows are un-permuted back to the model's rotate-half layout.

The file is read by export/gguf_read.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
from pathlib import Path

import torch
import torch.nn as nn
from gguf import GGMLQuantizationType, GGUFReader

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.export import gguf_format as names
from fanformer.export.gguf_read import Metadata, config_from_metadata, llama_unpermute, open_gguf, tokenizer_from_metadata
from fanformer.model import FANformer, KVCache
from fanformer.validate import check_context_fits, check_finite
from fanformer.runtime.backend import Backend, BackendInfo, register, resolve_device, resolve_dtype
from fanformer.runtime.gguf_layers import (DEQUANTIZED_TYPES, FLOAT_TYPES, QUANT_TYPES, Fp16Linear, GGUFEmbedding, Q, SharedInputLinear,
                                           dequantize, make_linear)

log = logging.getLogger(__name__)
ENGINES = ("auto", "ggml", "torch")


@functools.cache
def ggml_missing() -> str | None:
    """Why the ggml engine cannot run here (ggml-python not installed, or its library not
    built), or None when it can. Imported on first use: `import ggml` loads the library."""
    try:
        import fanformer.runtime.ggml_engine  # noqa: F401
    except Exception as err:  # ImportError, or OSError / RuntimeError from loading libggml
        return f"{type(err).__name__}: {err}"
    return None


def resolve_engine(engine: str) -> str:
    """"ggml" or "torch" for an --engine choice; auto falls back to torch, with one warning,
    where ggml-python does not import."""
    if engine not in ENGINES:
        raise FANformerError(f"unknown GGUF engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return engine
    missing = ggml_missing()
    if missing is None:
        return "ggml"
    if engine == "ggml":
        raise FANformerError(f"--engine ggml needs ggml-python, which does not load here ({missing}); "
                             "pip install ggml-python, or use --engine torch")
    _warn_fallback(missing)
    return "torch"


@functools.cache  # one warning a process, not one a file
def _warn_fallback(missing: str) -> None:
    log.warning("ggml-python does not load here (%s): GGUF files run on the slower torch engine; "
                "pip install ggml-python for the ggml one", missing)


# --- The backend ---------------------------------------------------------------------

def _gguf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ne[0] (the row) is the last torch dim


def _release_load_memory(reader: GGUFReader) -> None:
    """Packing reads a tensor from the file and goes through transient copies (int32
    planes, fbgemm's fp32 staging): drop the file pages read so far (pages still in use
    fault back in; nothing ever writes to the copy-on-write map) and hand freed heap back
    to the OS (glibc keeps it otherwise). Run after each layer is packed, so the load
    never holds the file and its repacked copy at once, and resident memory is what the
    model holds."""
    mapped = getattr(reader.data, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


@register("gguf", detect=names.is_gguf_file)
class GGUFBackend(Backend):
    """Options: device cpu|auto (both engines run on the CPU); dtype, if given, must be
    fp32 (the compute dtype outside the weight kernels); engine auto|ggml|torch (auto:
    ggml where ggml-python loads); threads (default: the physical cores for ggml, torch's
    own setting for torch)."""

    def __init__(self, path: Path, dtype: str = "fp32", device: str = "cpu", engine: str = "auto",
                 threads: int | None = None):
        path = Path(path)
        if resolve_dtype(dtype) != torch.float32:
            raise FANformerError(f"the GGUF backend computes in fp32 around the file's own weight types; "
                                 f"--dtype {dtype} is not available (export another --type instead)")
        if device != "auto" and resolve_device(device).type != "cpu":
            raise FANformerError("the GGUF backend runs on the CPU only; use --device cpu")
        if threads is not None and threads < 1:
            raise FANformerError(f"--threads must be at least 1, got {threads}")
        self.engine = resolve_engine(engine)
        if not path.is_file():
            raise FANformerError(f"{path} is not a file: pass the .gguf file itself")
        reader = open_gguf(path)
        meta = Metadata(reader, path)
        arch = meta.require(names.GENERAL_ARCHITECTURE, kind=str)
        if arch not in (names.ARCH, names.LLAMA_ARCH):
            raise FANformerError(f"{path} is a {arch!r} model; this backend runs {names.ARCH!r} and "
                                 f"{names.LLAMA_ARCH!r} files only")
        tensors = {t.name: t for t in reader.tensors}
        self.config = config_from_metadata(meta, arch, set(tensors))
        self.arch = arch
        self.tokenizer, ids = tokenizer_from_metadata(meta)
        with torch.device("meta"):
            model = FANformer(self.config)
        state = self._check_tensors(tensors, model, path)  # {state key: (data, type)}
        self.module = self.ggml = None
        if self.engine == "ggml":  # its KV store holds the whole context from the start
            check_context_fits(self.config.n_layers, self.config.n_kv_heads, self.config.head_dim,
                               self.config.max_seq_len, 4, path, names.CONTEXT_LENGTH.format(arch=arch))
            from fanformer.runtime.ggml_engine import GGMLEngine, physical_cores

            self.ggml = GGMLEngine(reader, tensors, self.config, threads or physical_cores(),
                                   interleaved_rope=arch == names.LLAMA_ARCH)
        else:
            if threads is not None:
                torch.set_num_threads(threads)
            self.module = self._build(model, state, lambda: _release_load_memory(reader))
        weight_types = "+".join(sorted({t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) > 1}))
        self.info = BackendInfo(format="gguf", path=str(path), vocab_size=self.config.vocab_size,
                                max_seq_len=self.config.max_seq_len, dtype=f"fp32 ({weight_types} weights)",
                                device="cpu", **ids)

    def _check_tensors(self, tensors: dict, model: FANformer, path: Path) -> dict:
        """The file's tensors against the ones the config implies (`model`, on the meta
        device): every name present, no other, each of the right shape and an allowed type.
        {state key: (torch view of the data, type)}."""
        config = self.config
        keys = [k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")]
        by_name = names.tensor_names(keys)  # {GGUF name: state key}
        unknown, missing = set(tensors) - set(by_name), set(by_name) - set(tensors)
        if unknown:
            raise FANformerError(f"{path} holds tensors this {self.arch} model does not have: "
                                 f"{', '.join(sorted(unknown)[:5])}; the file and its hyperparameters disagree")
        if missing:
            raise FANformerError(f"{path} lacks tensors its hyperparameters call for: {', '.join(sorted(missing)[:5])}")
        return {key: self._tensor(tensors[name], model.state_dict()[key].shape, path) for name, key in by_name.items()}

    def _build(self, model: FANformer, state: dict, release_load_memory) -> FANformer:
        """The torch engine: the model on the meta device, then every tensor put in place:
        2-D weights as GGUF layers, 1-D ones (norms, biases, gates) as float32 parameters.
        `release_load_memory()` runs after each layer is built."""
        config = self.config
        if self.arch == names.LLAMA_ARCH:
            for key, n_head in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
                for i in range(config.n_layers):
                    data, qtype = state[f"blocks.{i}.attn.{key}.weight"]
                    state[f"blocks.{i}.attn.{key}.weight"] = (llama_unpermute(data, n_head).contiguous(), qtype)
        if config.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]

        linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        for members in _shared_input_groups(config, linears):
            weights = [state[f"{m}.weight"] for m in members]
            qtypes = {qtype for _, qtype in weights}
            if len(qtypes) > 1 or Q.F32 in qtypes or any(f"{m}.bias" in state for m in members):
                continue  # F32 weights stay zero-copy views of the file
            joint = make_linear(torch.cat([data for data, _ in weights]), qtypes.pop(), None)
            release_load_memory()
            shared = SharedInputLinear(joint, [data.shape[0] for data, _ in weights])
            for name, member in zip(members, shared.members):
                _set_submodule(model, name, member)
                del state[f"{name}.weight"]
        for key, (data, qtype) in state.items():
            owner_name, _, leaf = key.rpartition(".")
            if key == "embed.weight":
                model.embed = GGUFEmbedding(data, qtype)
            elif owner_name in linears and leaf == "weight":
                bias = state.get(f"{owner_name}.bias")
                bias = None if bias is None else dequantize(*bias).clone()
                _set_submodule(model, owner_name, make_linear(data, qtype, bias))
                release_load_memory()
            elif owner_name not in linears:  # norms and residual gates
                module = model.get_submodule(owner_name) if owner_name else model
                module._parameters[leaf] = nn.Parameter(dequantize(data, qtype).clone(), requires_grad=False)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        assert not left, f"tensors not loaded: {left}"
        return model.eval()

    def _tensor(self, tensor, shape: torch.Size, path: Path) -> tuple[torch.Tensor, GGMLQuantizationType]:
        """A tensor as stored, checked against the shape the config implies: a torch view
        of the memory map, (rows, n) for float types and (rows, row bytes) for q* types."""
        qtype, gguf_shape = tensor.tensor_type, _gguf_shape(tensor)
        allowed = FLOAT_TYPES if len(shape) == 1 else FLOAT_TYPES + QUANT_TYPES + DEQUANTIZED_TYPES
        if qtype not in allowed:
            raise FANformerError(f"{path}: tensor {tensor.name} is {qtype.name}; a {len(shape)}-D tensor must be one of "
                                 f"{', '.join(t.name for t in allowed)}")
        if gguf_shape != tuple(shape):
            raise FANformerError(f"{path}: tensor {tensor.name} has shape {gguf_shape}, the hyperparameters imply "
                                 f"{tuple(shape)}; the file is damaged or mixed from two models")
        data = torch.from_numpy(tensor.data)  # BF16 comes as bytes: (rows, 2 n) uint8
        if qtype in FLOAT_TYPES:  # quantized blocks are not decoded here: the logits check catches theirs
            check_finite(tensor.name, data.view(torch.bfloat16) if qtype == Q.BF16 else data, path)
        return data, qtype

    def weight_bytes(self) -> int:
        """Bytes of every tensor the model holds (weights, packed planes, norms), and of the
        packed weights that fbgemm keeps outside torch tensors."""
        if self.ggml is not None:
            return self.ggml.weight_bytes()
        tensors = {id(t): t for t in list(self.module.parameters()) + list(self.module.buffers())}.values()
        opaque = {id(m): m for m in self.module.modules() if isinstance(m, Fp16Linear)}.values()
        return sum(t.numel() * t.element_size() for t in tensors) + sum(m.held_bytes() for m in opaque)

    def new_cache(self, batch_size: int):
        return self.ggml.new_cache(batch_size) if self.ggml is not None else self.module.new_cache()

    batching = True

    def join_caches(self, parts, length):
        return self.ggml.join_caches(parts, length) if self.ggml is not None else KVCache.join(parts, length)

    def forward(self, input_ids, attention_mask, cache):
        return self._run(input_ids, attention_mask, cache, last_only=False)

    def prefill(self, cache, input_ids, attention_mask, last_only: bool = False):
        return self._run(input_ids, attention_mask, cache, last_only)

    @torch.inference_mode()
    def _run(self, input_ids, attention_mask, cache, last_only: bool) -> torch.Tensor:
        if self.ggml is not None:
            return self.ggml.forward(input_ids.cpu(), None if attention_mask is None else attention_mask.cpu(), cache,
                                     last_only)
        # An all-ones mask is the plain causal case: leave it out so SDPA takes its fast path.
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        logits = self.module(input_ids, attention_mask=mask, cache=cache).float()
        return logits[:, -1:] if last_only else logits


SHARED_INPUT = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("ffn.gate_proj", "ffn.up_proj"))


def _shared_input_groups(config: FANformerConfig, linears: set[str]) -> list[list[str]]:
    """Linear layers of each block that read the same tensor: Q, K, V and gate, up (with
    CoLA, their first factors A)."""
    groups = []
    for i in range(config.n_layers):
        for group in SHARED_INPUT:
            for factor in ("", ".lora_a"):
                members = [f"blocks.{i}.{name}{factor}" for name in group]
                if all(m in linears for m in members):
                    groups.append(members)
    return groups


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
