"""onnxruntime-genai on an exported ONNX folder: KV-cached greedy generation.

onnxruntime-genai runs the folder from its genai_config.json alone, the way an edge
application would. It owns its cache and returns only the newest position's logits, so
it serves generation and decode timing here, not perplexity (which scores every
position through the ONNX backend instead).
"""

from __future__ import annotations

import json
from pathlib import Path

from fanformer.errors import FANformerError
from fanformer.runtime.guard import genai_call
from fanformer.validate import read_json


def load_model(og, folder: str | Path, threads: int = 0):
    """`og.Model` of an exported folder (onnxruntime's intra-op thread count set when
    `threads` is given); genai's own failure becomes one user-facing error."""
    try:
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        return og.Model(config)
    except Exception as err:  # genai raises RuntimeError with its own text
        raise FANformerError(f"onnxruntime-genai cannot load {folder} ({err}); "
                             "export the checkpoint again with `fanformer export --format onnx`") from None


class GenaiSession:
    """One greedy generation at a time: `prefill(prompt_ids)`, then `step()` per token."""

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(folder)
        self.model = load_model(og, folder, threads)
        self.tokenizer = genai_call(self.folder, og.Tokenizer, self.model)
        self.eos_id = read_json(self.folder / "genai_config.json")["model"]["eos_token_id"]
        self.generator = None

    def prefill(self, prompt_ids: list[int], max_length: int) -> None:
        params = genai_call(self.folder, self.og.GeneratorParams, self.model)
        genai_call(self.folder, lambda: params.set_search_options(max_length=max_length, do_sample=False))
        self.generator = genai_call(self.folder, self.og.Generator, self.model, params)
        genai_call(self.folder, self.generator.append_tokens, list(prompt_ids))

    def step(self) -> int | None:
        """The next greedy token, or None once generation has ended (EOS or max_length)."""
        if self.generator.is_done():
            return None
        genai_call(self.folder, self.generator.generate_next_token)
        return int(genai_call(self.folder, self.generator.get_next_tokens)[0])

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt_ids`, EOS left out, as `runtime.reference_greedy`."""
        self.prefill(prompt_ids, len(prompt_ids) + max_new_tokens)
        out = []
        while (token := self.step()) is not None:
            out.append(token)
        return out[:-1] if out and out[-1] == self.eos_id else out
