"""The ONNX backend: an exported folder (or its model.onnx) run by onnxruntime.

Both graphs take the KV cache as inputs and return it as outputs (the Optimum layout of
export/onnx_format.py); the backend keeps those tensors between calls.

- The fused graph (export/onnx_fused.py): GroupQueryAttention writes each step's keys
  and values into the past buffer in place. The cache is one preallocated OrtValue per
  tensor, bound through I/O binding as both past and present, so a step copies nothing;
  when a sequence outgrows it, it is reallocated at twice the length (up to max_seq_len).
- The plain graph concatenates: present is a new, longer tensor that becomes the next
  step's past. On CUDA the tensors stay on the GPU through I/O binding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fanformer.export import onnx_format as names
from fanformer.checkpoint import CONFIG_FILE, load_generation_config
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import apply_rope, rope_cos_sin
from fanformer.tokenizer import load_tokenizer, special_token_ids
from fanformer.runtime.backend import Backend, BackendInfo, register
from fanformer.runtime.guard import check_onnx_session, ort_run

ONNX_DTYPES = {"tensor(float)": ("fp32", np.float32), "tensor(float16)": ("fp16", np.float16)}


def onnx_model_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / names.MODEL_FILE).is_file():
        return path / names.MODEL_FILE
    return None


class OnnxCache:
    """The past keys and values of every layer: numpy arrays on the CPU, OrtValues on CUDA;
    for the fused graph, OrtValue buffers whose first `length` positions are filled, and the
    I/O binding that holds them (bound once per buffer, not per step)."""

    def __init__(self, past: list, length: int = 0):
        self.past = past
        self.length = length
        self.binding = None
        self.logits = {}  # (B, T) -> a preallocated logits buffer (numpy, OrtValue)

# The fused graph's first KV buffer length; it doubles as sequences grow.
FIRST_CAPACITY = 256


@register("onnx", detect=lambda path: onnx_model_file(path) is not None)
class OnnxBackend(Backend):
    """Options: device cpu|cuda|auto (CUDA needs onnxruntime-gpu); dtype, if given, must
    be the dtype the folder was exported in."""

    def __init__(self, path: Path, dtype: str | None = None, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        model_file = onnx_model_file(path)
        if model_file is None:
            raise FANformerError(f"{path} is not an exported ONNX model: expected a folder with "
                                 f"{names.MODEL_FILE} or a .onnx file")
        folder = model_file.parent
        if not (folder / CONFIG_FILE).is_file():
            raise FANformerError(f"{model_file} has no {CONFIG_FILE} beside it, so it is not a FANformer export: "
                                 "pass the folder `fanformer export` wrote (model.onnx, config.json, tokenizer.json)")
        self.config = FANformerConfig.from_file(folder)
        self.tokenizer = load_tokenizer(folder)
        self.generation_defaults = load_generation_config(folder)

        providers = ["CPUExecutionProvider"]
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise FANformerError("--device cuda needs onnxruntime-gpu and a CUDA GPU; use --device cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise FANformerError(f"onnxruntime cannot load {model_file} ({str(err).splitlines()[0][:200]}); "
                                 "the file is corrupted or not a FANformer export: export it again") from None
        check_onnx_session(self.session, self.config, model_file)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        kv_type = {i.name: i.type for i in self.session.get_inputs()}.get(names.PAST_KEY % 0)
        if kv_type not in ONNX_DTYPES:
            raise FANformerError(f"{model_file} has no {names.PAST_KEY % 0} input of a float type: "
                                 "it is not a FANformer export")
        model_dtype, self.kv_dtype = ONNX_DTYPES[kv_type]
        if dtype is not None and dtype != model_dtype:
            raise FANformerError(f"{model_file} was exported in {model_dtype}; it cannot run in {dtype} "
                                 f"(export again with --dtype {dtype})")
        ids = special_token_ids(self.tokenizer)
        self.info = BackendInfo(format="onnx", path=str(path), vocab_size=self.config.vocab_size,
                                max_seq_len=self.config.max_seq_len, bos_id=ids["bos_token_id"],
                                eos_id=ids["eos_token_id"], pad_id=ids["pad_token_id"], dtype=model_dtype,
                                device="cuda" if self.on_cuda else "cpu")
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.fused = metadata.get(names.META_GRAPH) == names.FUSED
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.input_names = [n for n in names.input_names(self.config.n_layers) if n in graph_inputs]
        self.output_names = names.output_names(self.config.n_layers)

    def new_cache(self, batch_size: int) -> OnnxCache:
        c = self.config
        if self.fused:
            return OnnxCache(self._buffers(batch_size, min(FIRST_CAPACITY, c.max_seq_len)))
        empty = np.zeros((batch_size, c.n_kv_heads, 0, c.head_dim), dtype=self.kv_dtype)
        return OnnxCache([empty] * (2 * c.n_layers))

    def forward(self, input_ids, attention_mask, cache):
        batch, new = input_ids.shape
        fresh = cache is None
        cache = self.new_cache(batch) if fresh else cache
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        feeds = [input_ids.long().numpy(), mask.long().numpy()]
        if self.fused:
            return self._run_fused(feeds, cache)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]  # as fanformer.model does
        feeds.append(positions.numpy())
        run = self._run_cuda if self.on_cuda else self._run_cpu
        logits, present = run(feeds, cache.past)
        if not fresh:
            cache.past = present
        return logits

    batching = True

    def join_caches(self, parts: list[tuple[OnnxCache, list[int]]], length: int) -> OnnxCache:
        """A cache of `length` positions holding the listed rows of each part, in order, each
        part's last positions right-aligned (the Backend.join_caches contract). The rows go
        through host memory (numpy), once per join.

        The fused graph rotates a key by its cache slot (export/onnx_fused.py), so a row that
        moves from slot s to s + shift gets its keys rotated on by `shift` positions: RoPE
        rotations compose, and the row's keys are then where its next queries expect them.
        The plain graph takes positions from the mask and needs no such turn."""
        c = self.config
        batch = sum(len(rows) for _, rows in parts)
        capacity = max(length, min(max(FIRST_CAPACITY, 2 * length), c.max_seq_len)) if self.fused else length
        joined = [np.zeros((batch, c.n_kv_heads, capacity, c.head_dim), self.kv_dtype) for _ in range(2 * c.n_layers)]
        first = 0
        for cache, rows in parts:
            held = cache.length if self.fused else _shape(cache.past[0])[2]
            take, shift = min(held, length), length - held
            for i, value in enumerate(cache.past):  # key, value per layer (onnx_format.past_names)
                part = (value if isinstance(value, np.ndarray) else value.numpy())[rows, :, held - take:held]
                if self.fused and i % 2 == 0 and shift:  # a key
                    part = _rotated(part, shift, c)
                joined[i][first:first + len(rows), :, length - take:length] = part
            first += len(rows)
        if self.fused or self.on_cuda:
            import onnxruntime as ort

            device = "cuda" if self.on_cuda else "cpu"
            joined = [ort.OrtValue.ortvalue_from_numpy(array, device, 0) for array in joined]
        return OnnxCache(joined, length if self.fused else 0)

    def _buffers(self, batch: int, capacity: int, old: list | None = None) -> list:
        """One KV buffer per past input, (B, nkv, capacity, hs), holding `old`'s contents."""
        import onnxruntime as ort

        c = self.config
        shape = (batch, c.n_kv_heads, capacity, c.head_dim)
        device = "cuda" if self.on_cuda else "cpu"
        if old is None:
            return [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, device, 0)
                    for _ in range(2 * c.n_layers)]
        grown = []
        for value in old:  # host round trip, once per doubling
            array = np.zeros(shape, self.kv_dtype)
            before = value.numpy()
            array[:, :, :before.shape[2]] = before
            grown.append(ort.OrtValue.ortvalue_from_numpy(array, device, 0))
        return grown

    def _run_fused(self, feeds: list, cache: OnnxCache) -> torch.Tensor:
        """One step of the fused graph, the cache bound in place as both past and present."""
        (batch, new), total = feeds[0].shape, feeds[1].shape[1]  # the mask spans cached and new tokens
        if batch > 1 and new > 1 and cache.length:
            # GroupQueryAttention's CPU kernel takes several new tokens over a cache at batch 1
            # only: feed them one at a time (the same causal result).
            return torch.cat([self._run_fused([feeds[0][:, [i]], feeds[1][:, :total - new + i + 1]], cache)
                              for i in range(new)], dim=1)
        if total > self.config.max_seq_len:
            raise FANformerError(f"{total} tokens exceed the model's context of {self.config.max_seq_len}")
        capacity = cache.past[0].shape()[2]
        if total > capacity:
            new_capacity = min(max(2 * capacity, total), self.config.max_seq_len)
            cache.past = self._buffers(feeds[0].shape[0], new_capacity, cache.past)
            cache.binding = None
        if cache.binding is None:
            cache.binding = self.session.io_binding()
            for past, present, value in zip(self.input_names[len(feeds):], self.output_names[1:], cache.past):
                cache.binding.bind_ortvalue_input(past, value)
                cache.binding.bind_ortvalue_output(present, value)
        binding = cache.binding
        for name, value in zip(self.input_names, feeds):
            binding.bind_cpu_input(name, value)
        # Logits into a buffer kept per shape (a decode step's is the same every time), read
        # back without wrapping every output.
        if (batch, new) not in cache.logits:
            import onnxruntime as ort

            array = np.empty((batch, new, self.config.vocab_size), dtype=self.kv_dtype)
            cache.logits[batch, new] = (array, ort.OrtValue.ortvalue_from_numpy(array))
        array, value = cache.logits[batch, new]
        binding.bind_ortvalue_output(names.LOGITS, value)
        ort_run(self.info.path, self.session.run_with_iobinding, binding)
        cache.length = total
        return torch.from_numpy(array.astype(np.float32))  # a copy: the buffer is reused next step

    def _run_cpu(self, feeds: list, past: list):
        outputs = ort_run(self.info.path, self.session.run, self.output_names, dict(zip(self.input_names, feeds + past)))
        return torch.from_numpy(outputs[0]).float(), outputs[1:]

    def _run_cuda(self, feeds: list, past: list):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in zip(self.input_names, feeds + past):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(names.LOGITS, "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, "cuda", 0)
        ort_run(self.info.path, self.session.run_with_iobinding, binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()).float(), list(outputs[1:])


def _shape(value) -> tuple:
    return value.shape if isinstance(value, np.ndarray) else tuple(value.shape())


def _rotated(keys: np.ndarray, shift: int, config: FANformerConfig) -> np.ndarray:
    """Keys (B, nkv, S, hs) rotated by RoPE on by `shift` positions, in fp32, in their dtype."""
    cos, sin = rope_cos_sin(torch.tensor([[shift]]), config.head_dim, config.rope_theta)  # (1, 1, 1, hs)
    return apply_rope(torch.from_numpy(keys.astype(np.float32)), cos, sin).numpy().astype(keys.dtype)
