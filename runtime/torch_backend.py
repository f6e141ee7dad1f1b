"""The PyTorch backend: a FANformer checkpoint directory run by `fanformer.model`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fanformer.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_generation_config
from fanformer.model import FANformer, KVCache
from fanformer.quant.checkpoint import load_any_model
from fanformer.tokenizer import load_tokenizer, special_token_ids
from fanformer.runtime.backend import Backend, BackendInfo, register, resolve_device, resolve_dtype


def is_fanformer_checkpoint(path: Path) -> bool:
    if not (path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("model_type") == "fanformer"
    except (ValueError, AttributeError, RecursionError):
        return False  # detect_format then reports what is wrong with config.json


@register("pytorch", detect=is_fanformer_checkpoint)
class TorchBackend(Backend):
    """Options: dtype fp32|fp16|bf16 (compute), device cpu|cuda|auto, and
    round_weights="fp16" to round the weights to fp16 first (the FP16 reference)."""

    def __init__(self, path: Path, dtype: str = "fp32", device: str = "cpu", round_weights: str | None = None):
        model = load_any_model(path)  # GPTQ-packed or bnb int8/nf4 layers stay so in memory (quant/)
        self._setup(model, load_tokenizer(path), str(path), dtype, device, round_weights)
        self.generation_defaults = load_generation_config(path)

    @classmethod
    def from_model(cls, model: FANformer, tokenizer=None, dtype: str = "fp32", device: str = "cpu",
                   round_weights: str | None = None) -> "TorchBackend":
        """Wrap an in-memory model (tests, benchmarks); without a tokenizer only `forward` works.
        The backend takes the model over: it is cast (and rounded) in place."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, "<memory>", dtype, device, round_weights)
        return backend

    def _setup(self, model: FANformer, tokenizer, path: str, dtype: str, device: str, round_weights: str | None):
        torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
        if round_weights is not None:
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    if tensor.is_floating_point():  # a quantized model's packed integers stay as they are
                        tensor.copy_(tensor.to(resolve_dtype(round_weights)).to(tensor.dtype))
        self.model = model.to(device=torch_device, dtype=torch_dtype).eval()
        self.tokenizer = tokenizer
        ids = special_token_ids(tokenizer) if tokenizer is not None else \
            {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
        config = model.config
        self.info = BackendInfo(format="pytorch", path=path, vocab_size=config.vocab_size,
                                max_seq_len=config.max_seq_len, bos_id=ids["bos_token_id"],
                                eos_id=ids["eos_token_id"], pad_id=ids["pad_token_id"],
                                dtype=dtype if round_weights is None else f"{dtype} ({round_weights} weights)",
                                device=str(torch_device))
        self.device = torch_device

    def new_cache(self, batch_size: int):
        return self.model.new_cache()

    batching = True

    def join_caches(self, parts, length):
        return KVCache.join(parts, length)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, cache):
        input_ids = input_ids.to(self.device)
        # An all-ones mask is the plain causal case: leave it out so SDPA takes its fast path.
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(self.device)
        return self.model(input_ids, attention_mask=mask, cache=cache).float()
