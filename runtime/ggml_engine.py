"""The ggml engine of the GGUF backend: a GGUF file run by ggml's CPU kernels, as
llama.cpp runs its files, with Python touching only token ids and logits per step.

Engine: ggml (https://github.com/ggml-org/ggml) through ggml-python (ctypes bindings of
ggml.h, ggml-alloc.h, ggml-backend.h and ggml-cpu.h). Format: GGUF v2/v3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), read and checked by
runtime/gguf_backend.py; the graph is runtime/ggml_graph.py.

- Weights stay in the file: every tensor is a ggml tensor over the memory-mapped file
  (`ggml_backend_cpu_buffer_from_ptr`), in its own type, and ggml's `mul_mat` runs that
  type. The one exception is llama.cpp's own: where ggml's CPU backend offers a repacked
  layout for a type (its CPU_REPACK buffer type: Q4_0 rows interleaved 8 by 8 for
  AVX2 / AVX-512 here), the matrices of that type are copied once into it, still Q4_0,
  as llama.cpp does by default; `repack=False` keeps them in the file.
- The KV cache is ggml tensors (runtime/ggml_graph.py explains the layout), f16 as
  llama.cpp's default, f32 for an f32 file and for heads under 64 wide (`default_kv_type`).
  A cache (`GGMLCache`) is a handle on a `KVStore`; a store outlives its handle and is
  handed to the next `new_cache` of the same batch size, graphs included, so repeated
  generations reuse both.
- Graphs are built per shape (batch, new tokens, cache positions attended, logits of
  every or only the last position) and kept, each with its own compute buffer
  (ggml-alloc assigns a graph's tensors once; a shared buffer would move them). The
  positions attended grow in steps of KV_PAD, as llama.cpp pads n_kv, so one decode
  graph serves KV_PAD steps; the mask hides the positions not yet written.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from gguf import quants

import ggml as G

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.runtime.ggml_graph import Graph, Model, Shape, build

log = logging.getLogger(__name__)

KV_PAD = 256  # cache positions attended grow in steps of this (llama.cpp pads n_kv to 256 too)
MAX_GRAPHS = 8  # graphs kept per store (least recently used dropped): prefill lengths vary
MAX_IDLE_STORES = 4  # KV stores no cache uses, kept for the next new_cache (least recently used freed)
REPACK_BUFFER = b"CPU_REPACK"
# ggml-python 0.0.45 declares this function's result as a Python int (ctypes' c_int), which
# cuts a 64-bit pointer to 32 bits: the same C function, declared with a pointer result.
_cpu_buffer_from_ptr = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes.cast(G.ggml_backend_cpu_buffer_from_ptr, ctypes.c_void_p).value)


@G.ggml_log_callback
def _ggml_log(level: int, text: bytes, user_data) -> None:
    """ggml's log lines (e.g. each tensor it repacks) go to this module's logger, not stderr."""
    log.log(logging.WARNING if level in (G.GGML_LOG_LEVEL_WARN, G.GGML_LOG_LEVEL_ERROR) else logging.DEBUG,
            "ggml: %s", text.decode(errors="replace").rstrip())


G.ggml_log_set(_ggml_log, None)  # the library's one log hook; _ggml_log lives as long as this module


@functools.cache  # once a process
def _warn_without_llamafile() -> None:
    """llama.cpp builds ggml with its llamafile GEMMs (sgemm.cpp) for f16, q8_0 and q4_0
    prompts; ggml-python builds without them unless told."""
    if not G.ggml_cpu_has_llamafile():
        log.warning("ggml-python was built without GGML_LLAMAFILE (llama.cpp builds with it): prompts of f16, q8_0 "
                    "and q4_0 GGUF files run about 2x slower; rebuild it with CMAKE_ARGS=\"-DGGML_LLAMAFILE=ON\" "
                    "pip install --force-reinstall --no-cache-dir --no-deps ggml-python==0.0.45")


def physical_cores() -> int:
    """llama.cpp's default thread count: the physical cores this process may run on (SMT
    siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def step_inputs(attention_mask: np.ndarray | None, past: int, batch: int, tokens: int, n_kv: int,
                n_ctx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-step graph inputs, as fanformer/model.py derives them: RoPE positions (N,)
    int32 (the count of real tokens before each one), cache rows (N,) int64, and the
    attention mask (B, T, n_kv) f16, 0 where a new token may attend (causal, real
    tokens; a left-pad query sees itself so softmax stays finite) and -inf elsewhere.
    `attention_mask` (B, past + T) marks real tokens, or None: all real."""
    q_pos = past + np.arange(tokens)[:, None]  # (T, 1)
    k_pos = np.arange(n_kv)[None, :]  # (1, n_kv)
    allowed = k_pos <= q_pos  # (T, n_kv)
    if attention_mask is None or attention_mask.all():
        positions = np.broadcast_to(q_pos[:, 0], (batch, tokens))
        allowed = np.broadcast_to(allowed, (batch, tokens, n_kv))
    else:
        positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)[:, -tokens:]
        real = np.zeros((batch, n_kv), dtype=bool)
        real[:, :past + tokens] = attention_mask
        allowed = (allowed[None] & real[:, None, :]) | (k_pos == q_pos)[None]
    rows = (np.arange(batch)[:, None] * n_ctx + q_pos[:, 0][None, :]).astype(np.int64)
    mask = np.where(allowed, np.float16(0), np.float16(-np.inf))
    return (np.ascontiguousarray(positions, dtype=np.int32).ravel(), rows.ravel(), np.ascontiguousarray(mask))


def default_kv_type(config: FANformerConfig, tensors: dict) -> int:
    """f16, llama.cpp's default, except: f32 for an all-f32 file (its results should be
    fp32 throughout), and f32 for heads under 64 wide, whose f16 rows ggml's AVX-512
    vector kernels (64 elements a step) run in scalar code: `small` (head_dim 32) decodes
    at 479 tokens of context in 1.05 ms a step with an f32 cache against 2.0 ms with f16,
    while seed-92m (64) takes the same time with either."""
    all_f32 = all(int(t.tensor_type) == G.GGML_TYPE_F32 for t in tensors.values())
    return G.GGML_TYPE_F32 if all_f32 or config.head_dim < 64 else G.GGML_TYPE_F16


class KVStore:
    """K and V tensors of every layer for `batch` sequences of up to `n_ctx` positions,
    in one backend buffer, and the graphs built over them."""

    def __init__(self, model: Model, backend, kv_type: int, batch: int, n_ctx: int):
        c = model.config
        self.model, self.backend, self.batch, self.n_ctx = model, backend, batch, n_ctx
        self.ctx = G.ggml_init(G.ggml_init_params(mem_size=(2 * c.n_layers + 1) * G.ggml_tensor_overhead(),
                                                  mem_buffer=None, no_alloc=True))
        width = c.n_kv_heads * c.head_dim
        self.k = [G.ggml_new_tensor_2d(self.ctx, kv_type, width, n_ctx * batch) for _ in range(c.n_layers)]
        self.v = [G.ggml_new_tensor_2d(self.ctx, kv_type, width, n_ctx * batch) for _ in range(c.n_layers)]
        self.buffer = G.ggml_backend_alloc_ctx_tensors(self.ctx, backend)
        if not self.buffer:
            raise FANformerError(f"ggml could not allocate a KV cache for {batch} x {n_ctx} positions; "
                                 "use a smaller batch")
        G.ggml_backend_buffer_clear(self.buffer, 0)  # masked positions are skipped, but never NaN
        self.graphs: OrderedDict[Shape, tuple[Graph, object]] = OrderedDict()  # shape -> (graph, allocator)
        self.owner = lambda: None  # weakref to the GGMLCache using it

    def graph(self, shape: Shape) -> Graph:
        if shape in self.graphs:
            self.graphs.move_to_end(shape)
            return self.graphs[shape][0]
        graph = build(self.model, self.k, self.v, self.n_ctx, shape)
        allocator = G.ggml_gallocr_new(G.ggml_backend_get_default_buffer_type(self.backend))
        if not G.ggml_gallocr_alloc_graph(allocator, graph.graph):
            raise FANformerError(f"ggml could not allocate the compute buffer for {shape}; use a smaller batch")
        self.graphs[shape] = (graph, allocator)
        if len(self.graphs) > MAX_GRAPHS:
            _free_graph(*self.graphs.popitem(last=False)[1])
        return graph

    def free(self) -> None:
        for graph, allocator in self.graphs.values():
            _free_graph(graph, allocator)
        self.graphs.clear()
        G.ggml_backend_buffer_free(self.buffer)
        G.ggml_free(self.ctx)


def _free_graph(graph: Graph, allocator) -> None:
    G.ggml_gallocr_free(allocator)
    G.ggml_free(graph.context)


class GGMLCache:
    """What `new_cache` hands out: the tokens held so far (`length`, the same for every
    sequence, left padding included) in a KV store that this cache alone writes to."""

    def __init__(self, store: KVStore):
        self.store, self.length = store, 0
        store.owner = weakref.ref(self)


class GGMLEngine:
    """A GGUF file's model on ggml's CPU backend. `tensors` are the file's tensors by name
    (gguf-py ReaderTensors, already checked against `config`); `reader` keeps their memory
    map alive. `kv_type` is the cache's ggml type (default: `default_kv_type`);
    `repack=False` leaves every matrix in the file."""

    def __init__(self, reader, tensors: dict, config: FANformerConfig, threads: int, interleaved_rope: bool = False,
                 kv_type: int | None = None, repack: bool = True):
        _warn_without_llamafile()
        self.config, self.reader = config, reader
        self.backend = G.ggml_backend_cpu_init()
        G.ggml_backend_cpu_set_n_threads(self.backend, threads)
        self.threads = threads
        self.kv_type = kv_type if kv_type is not None else default_kv_type(config, tensors)
        self.stores: list[KVStore] = []
        self._buffers, self._contexts = [], []
        weights = self._map_weights(tensors)
        if repack:
            weights.update(self._repack(tensors, weights))
        # llama.cpp's llama files store Q and K rows for interleaved RoPE pairs; the
        # project's own files keep the model's rotate-half pairs (ggml's NEOX mode).
        rope_mode = G.GGML_ROPE_TYPE_NORMAL if interleaved_rope else G.GGML_ROPE_TYPE_NEOX
        self.model = Model(config, weights, rope_mode, self._gates(tensors))
        weakref.finalize(self, _free_all, self.stores, self._buffers, self._contexts, self.backend)

    # --- Weights ---------------------------------------------------------------------

    def _map_weights(self, tensors: dict) -> dict:
        """Every tensor as a ggml tensor over the memory map: no copy."""
        data = self.reader.data  # the whole file, memory-mapped
        base = data.ctypes.data
        ctx = self._context(len(tensors))
        buffer = _cpu_buffer_from_ptr(base, data.nbytes)
        self._buffers.append(buffer)
        G.ggml_backend_buffer_set_usage(buffer, G.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        weights = {}
        for name, tensor in tensors.items():
            t = self._new_tensor(ctx, name, tensor)
            G.ggml_backend_tensor_alloc(buffer, t, ctypes.c_void_p(base + int(tensor.data_offset)))
            weights[name] = t
        return weights

    def _repack(self, tensors: dict, weights: dict) -> dict:
        """Matrices ggml's CPU_REPACK buffer takes (llama.cpp's default), copied into it once."""
        buffer_type = _repack_buffer_type()
        if buffer_type is None:
            return {}
        chosen = {name: t for name, t in tensors.items()
                  if name != "token_embd.weight" and len(t.shape) == 2  # get_rows reads the embedding as stored
                  and int(t.tensor_type) == G.GGML_TYPE_Q4_0 and int(t.shape[1]) % 8 == 0}
        if not chosen:
            return {}
        ctx = self._context(len(chosen))
        repacked = {name: self._new_tensor(ctx, name, tensor) for name, tensor in chosen.items()}
        buffer = G.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buffer_type)
        if not buffer:
            return {}
        self._buffers.append(buffer)
        for name, t in repacked.items():
            source = G.ggml_get_data(weights[name])  # the memory map
            G.ggml_backend_tensor_set(t, source, 0, G.ggml_nbytes(t))
        return repacked

    def _gates(self, tensors: dict) -> dict:
        """sigmoid(g) of every residual gate, once: two graph nodes a block fewer each step."""
        names = [name for name in tensors if name.endswith("residual_gate.weight")]
        if not names:
            return {}
        ctx = self._context(len(names))
        gates = {name: G.ggml_new_tensor_1d(ctx, G.GGML_TYPE_F32, int(tensors[name].shape[0])) for name in names}
        buffer = G.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
        self._buffers.append(buffer)
        for name, t in gates.items():
            g = quants.dequantize(tensors[name].data, tensors[name].tensor_type).astype(np.float64)
            _set(t, (1 / (1 + np.exp(-g))).astype(np.float32))
        return gates

    def _context(self, n_tensors: int):
        ctx = G.ggml_init(G.ggml_init_params(mem_size=(n_tensors + 1) * G.ggml_tensor_overhead(), mem_buffer=None,
                                             no_alloc=True))
        self._contexts.append(ctx)
        return ctx

    @staticmethod
    def _new_tensor(ctx, name: str, tensor):
        ne = [int(n) for n in tensor.shape]  # gguf-py lists ne[0] (the row) first, as ggml does
        t = G.ggml_new_tensor(ctx, int(tensor.tensor_type), len(ne), (ctypes.c_int64 * 4)(*ne))
        G.ggml_set_name(t, name.encode())
        return t

    def weight_bytes(self) -> int:
        """Bytes of the weights as the engine holds them: the file's tensors (repacked ones once)."""
        return sum(G.ggml_nbytes(t) for t in self.model.weights.values())

    # --- Caches and steps ------------------------------------------------------------

    def new_cache(self, batch: int, tokens: int = 0) -> GGMLCache:
        """A cache for `batch` sequences on a free store of max_seq_len positions (more if
        `tokens`, one uncached window, is longer), allocating one if none is free."""
        n_ctx = self.config.max_seq_len if tokens <= self.config.max_seq_len else -(-tokens // KV_PAD) * KV_PAD
        for store in self.stores:
            if store.owner() is None and store.batch == batch and store.n_ctx >= n_ctx:
                self.stores.remove(store)
                self.stores.append(store)  # most recently used last
                return GGMLCache(store)
        # A server's batch changes size as sequences come and go (join_caches), leaving a
        # store behind for each size: keep only the most recently used idle ones.
        idle = [store for store in self.stores if store.owner() is None]
        for store in idle[:max(0, len(idle) - MAX_IDLE_STORES)]:
            store.free()
            self.stores.remove(store)
        store = KVStore(self.model, self.backend, self.kv_type, batch, n_ctx)
        self.stores.append(store)
        return GGMLCache(store)

    def join_caches(self, parts: list[tuple[GGMLCache, list[int]]], length: int) -> GGMLCache:
        """A cache of `length` positions holding the listed rows of each part, in order, each
        part's last positions right-aligned (the Backend.join_caches contract). A store
        keeps sequence b's positions in rows b * n_ctx ..., so each row moves as one copy."""
        joined = self.new_cache(sum(len(rows) for _, rows in parts))
        store = joined.store
        for cache, _ in parts:
            if cache.store.owner() is not cache:
                raise FANformerError("this KV cache's memory went to a newer cache; start again with new_cache")
        for layer in range(self.config.n_layers):
            for kind in ("k", "v"):
                target = getattr(store, kind)[layer]
                row_bytes = G.ggml_nbytes(target) // (store.batch * store.n_ctx)
                target_data = _address(target)
                slot = 0
                for cache, rows in parts:
                    source = getattr(cache.store, kind)[layer]
                    source_data, source_ctx = _address(source), cache.store.n_ctx
                    take = min(cache.length, length)
                    for row in rows:
                        ctypes.memmove(target_data + (slot * store.n_ctx + length - take) * row_bytes,
                                       source_data + (row * source_ctx + cache.length - take) * row_bytes,
                                       take * row_bytes)
                        slot += 1
        joined.length = length
        return joined

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: GGMLCache | None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only, of input_ids (B, T) after
        what `cache` holds (None: scored from scratch, nothing kept)."""
        B, T = input_ids.shape
        cache = cache if cache is not None else self.new_cache(B, T)
        store, past = cache.store, cache.length
        if store.owner() is not cache:
            raise FANformerError("this KV cache's memory went to a newer cache; start again with new_cache")
        if store.batch != B:
            raise FANformerError(f"the cache holds {store.batch} sequences, the input {B}")
        if past + T > store.n_ctx:
            raise FANformerError(f"the context is full: {past} cached + {T} new tokens > {store.n_ctx}, "
                                 f"the model's max_seq_len")
        ids = input_ids.numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            # ggml's get_rows would read past the embedding (and abort the process) instead
            raise FANformerError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                                 f"{int(ids.min())}..{int(ids.max())}")
        mask = None if attention_mask is None else attention_mask.numpy()
        if mask is not None and mask.shape != (B, past + T):
            raise FANformerError(f"attention_mask is {tuple(mask.shape)}, expected {(B, past + T)} "
                                 "(the cached and the new tokens)")
        n_kv = min(store.n_ctx, -(-(past + T) // KV_PAD) * KV_PAD)
        graph = store.graph(Shape(B, T, n_kv, last_only))
        positions, rows, bias = step_inputs(mask, past, B, T, n_kv, store.n_ctx)
        _set(graph.ids, np.ascontiguousarray(ids, dtype=np.int32))
        _set(graph.positions, positions)
        _set(graph.rows, rows)
        _set(graph.mask, bias)
        status = G.ggml_backend_graph_compute(self.backend, graph.graph)
        if status != G.GGML_STATUS_SUCCESS:
            raise FANformerError(f"ggml failed to compute the graph (status {status})")
        cache.length = past + T
        vocab = self.config.vocab_size
        logits = np.empty((B, 1 if last_only else T, vocab), dtype=np.float32)
        G.ggml_backend_tensor_get(graph.logits, logits.ctypes.data_as(ctypes.c_void_p), 0, logits.nbytes)
        return torch.from_numpy(logits)


def _address(tensor) -> int:
    """Where a tensor's data lies in host memory (every buffer here is the CPU backend's)."""
    return int(G.ggml_get_data(tensor))


def _set(tensor, array: np.ndarray) -> None:
    G.ggml_backend_tensor_set(tensor, array.ctypes.data_as(ctypes.c_void_p), 0, array.nbytes)


def _repack_buffer_type():
    """ggml's CPU_REPACK buffer type, where this build and CPU have one (None otherwise)."""
    device = G.ggml_backend_dev_by_type(G.GGML_BACKEND_DEVICE_TYPE_CPU)
    registry = G.ggml_backend_dev_backend_reg(device)
    address = G.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    extra_buffer_types = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    i = 0
    while extra_buffer_types and extra_buffer_types[i]:
        if G.ggml_backend_buft_name(extra_buffer_types[i]) == REPACK_BUFFER:
            return extra_buffer_types[i]
        i += 1
    return None


def _free_all(stores: list, buffers: list, contexts: list, backend) -> None:
    for store in stores:
        store.free()
    for buffer in buffers:
        G.ggml_backend_buffer_free(buffer)
    for ctx in contexts:
        G.ggml_free(ctx)
    G.ggml_backend_free(backend)
