"""onnxruntime-genai behind the backend interface: the exported ONNX folder run the way
an edge application runs it, so perplexity, drift and decode timing measure genai's
own execution and not only the onnxruntime session of runtime/onnx_backend.py.

genai owns its KV cache inside an `og.Generator`: `append_tokens` runs the model on new
tokens over everything appended before, and `get_output("logits")` returns the logits of
exactly those new positions (all of them after a prompt, one after a single token). A
generator is one sequence, so this backend runs batch 1 only and has no padding:
`score` takes a batch of windows row by row, each on a fresh generator. It never
matches a path by itself (the folder is an ONNX export); ask for it by name:
`load_backend(folder, format="genai")`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fanformer.checkpoint import load_generation_config
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.tokenizer import load_tokenizer, special_token_ids
from fanformer.runtime.backend import Backend, BackendInfo, register
from fanformer.runtime.genai import load_model
from fanformer.runtime.guard import check_genai_config, genai_call

GENAI_CONFIG_FILE = "genai_config.json"


class GenaiCache:
    """One sequence: a genai generator, created on the first tokens appended."""

    def __init__(self):
        self.generator = None


@register("genai", detect=lambda path: False)
class GenaiBackend(Backend):
    """Options: device cpu|auto (the onnxruntime-genai package is the CPU build here). The
    folder runs in the dtype it was exported in, so a dtype cannot be chosen."""

    def __init__(self, path: Path, dtype: str | None = None, device: str = "cpu", threads: int = 0):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise FANformerError("onnxruntime-genai is not installed; `pip install onnxruntime-genai`") from None
        path = Path(path)
        folder = path.parent if path.is_file() else path
        if not (folder / GENAI_CONFIG_FILE).is_file():
            raise FANformerError(f"{folder} has no {GENAI_CONFIG_FILE}: pass the folder that "
                                 "`fanformer export --format onnx` wrote")
        if dtype is not None:
            raise FANformerError("the genai backend runs the folder in the dtype it was exported in; drop --dtype")
        if device not in ("cpu", "auto"):
            raise FANformerError(f"the genai backend runs on the CPU here; use --device cpu, not {device!r}")
        self.og = og
        self.folder = folder
        self.config = FANformerConfig.from_file(folder)
        self.tokenizer = load_tokenizer(folder)
        self.generation_defaults = load_generation_config(folder)
        ids = special_token_ids(self.tokenizer)
        check_genai_config(folder, self.config, ids)  # before genai allocates from its sizes
        self.model = load_model(og, folder, threads)
        self.info = BackendInfo(format="genai", path=str(path), vocab_size=self.config.vocab_size,
                                max_seq_len=self.config.max_seq_len, bos_id=ids["bos_token_id"],
                                eos_id=ids["eos_token_id"], pad_id=ids["pad_token_id"],
                                dtype="(as exported)",
                                device="cpu")

    def new_cache(self, batch_size: int) -> GenaiCache:
        if batch_size != 1:
            raise FANformerError("onnxruntime-genai runs one sequence per generator here; use batch size 1 "
                                 "(one prompt) with the genai backend")
        return GenaiCache()

    def _generator(self):
        params = genai_call(self.folder, self.og.GeneratorParams, self.model)
        genai_call(self.folder, lambda: params.set_search_options(max_length=self.info.max_seq_len, do_sample=False))
        return genai_call(self.folder, self.og.Generator, self.model, params)

    def _append(self, cache: GenaiCache, ids: list[int]) -> torch.Tensor:
        if cache.generator is None:
            cache.generator = self._generator()
        genai_call(self.folder, cache.generator.append_tokens, ids)
        logits = genai_call(self.folder, cache.generator.get_output, "logits")
        return torch.from_numpy(logits.copy()).float()  # (1, T, vocab)

    def forward(self, input_ids, attention_mask, cache):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise FANformerError("the genai backend takes unpadded sequences only (no left padding)")
        if cache is None:  # score each row from scratch on a generator of its own
            return torch.cat([self._append(GenaiCache(), row.tolist()) for row in input_ids], dim=0)
        if input_ids.shape[0] != 1:
            raise FANformerError("the genai backend runs batch 1 only")
        return self._append(cache, input_ids[0].tolist())
