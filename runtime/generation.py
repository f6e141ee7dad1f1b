"""KV-cached text generation over any backend, and the uncached reference beside it.

Sampling follows transformers' order: repetition penalty (CTRL, Keskar et al. 2019),
EOS suppression until `min_length`, temperature, top-k, top-p (nucleus, Holtzman et
al. 2019), then a draw. Prompts of different lengths are left-padded into one batch;
each row has its own random generator seeded with `seed`, so a prompt's output does not
depend on what it is batched with. Lengths follow transformers: `max_length` and
`min_length` count the prompt, `max_new_tokens` does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fanformer.errors import FANformerError
from fanformer.validate import guarded
from fanformer.runtime.backend import Backend

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None  # default DEFAULT_MAX_NEW_TOKENS unless max_length is set
    max_length: int | None = None  # prompt + new tokens
    min_length: int = 0  # prompt + new tokens before EOS may end a sequence
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_length", "min_length", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                if isinstance(value, float) and value.is_integer():  # 50.0 from a JSON file: the integer meant
                    setattr(self, name, int(value))
                else:
                    raise FANformerError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise FANformerError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise FANformerError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise FANformerError(f"max_length must be >= 1, got {self.max_length}")
        if self.min_length < 0:
            raise FANformerError(f"min_length must be >= 0, got {self.min_length}")
        if self.temperature < 0:
            raise FANformerError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise FANformerError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise FANformerError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise FANformerError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise FANformerError("stop strings must not be empty")

    def new_token_budget(self, prompt_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_len
        return DEFAULT_MAX_NEW_TOKENS


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop", "length" (budget) or "context" (model's max_seq_len)


# --- Logit processors: pure functions on (B, V) float logits -------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the sequence: divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # never drops the top token: its mass_before is 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Greedy at temperature 0, else one draw per row from softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    # A temperature (or repetition penalty) so extreme that the scaled logits overflow leaves
    # no distribution to draw from; its limit is the greedy choice.
    return torch.cat([torch.multinomial(row, 1, generator=g) if bool(torch.isfinite(row).all())
                      else logit_row.argmax()[None] for row, logit_row, g in zip(probs, logits, generators)])


def process_logits(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor,
                   lengths: torch.Tensor, eos_id: int) -> torch.Tensor:
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    too_short = lengths < config.min_length
    if too_short.any():
        logits = logits.clone()
        logits[too_short, eos_id] = float("-inf")
    if config.temperature == 0:
        return logits
    # Filter the tempered distribution (transformers' order), so top-p's nucleus is that
    # of the distribution drawn from; `next_tokens` applies the temperature itself.
    kept = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
    return logits.masked_fill(kept == float("-inf"), float("-inf"))


# --- Streaming text ---------------------------------------------------------------

def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to withhold: an unfinished UTF-8 sequence, or the
    start of a stop string that the next tokens may complete."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class _Row:
    """One sequence's output: tokens, text, what has been streamed, why it ended."""

    def __init__(self, budget: int):
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.budget = budget
        self.finish: str | None = None


# --- Generation ---------------------------------------------------------------------

def generate(backend: Backend, prompts: Sequence[str], config: GenerationConfig,
             on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
    """Continue each prompt; `on_text(row, delta)` receives text as it is produced."""
    tokenizer, info = backend.tokenizer, backend.info
    prompt_ids = check_prompts(backend, prompts, config)
    rows = [_Row(config.new_token_budget(len(ids))) for ids in prompt_ids]

    batch, width = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((batch, width), info.pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    seen = torch.zeros((batch, info.vocab_size), dtype=torch.bool)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
        seen[i, ids] = True
    lengths = torch.tensor([len(ids) for ids in prompt_ids])
    generators = [torch.Generator().manual_seed(config.seed) for _ in prompt_ids]

    cache = backend.new_cache(batch)
    logits = backend.prefill(cache, input_ids, mask, last_only=True)[:, -1].float().cpu()
    while True:
        check_logits(logits, backend, int(lengths.max()))
        chosen = next_tokens(process_logits(logits, config, seen, lengths, info.eos_id),
                             config.temperature, generators)
        for i, row in enumerate(rows):
            if row.finish is None:
                _advance(row, int(chosen[i]), int(lengths[i]) + 1, tokenizer, info, config)
                if on_text is not None:
                    _stream(row, i, config.stop, on_text)
        seen[torch.arange(batch), chosen] = True
        lengths += 1
        if all(row.finish is not None for row in rows):
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        logits = backend.decode(cache, chosen[:, None], mask)[:, -1].float().cpu()
    return [Generation(row.text, row.ids, row.finish) for row in rows]


def check_logits(logits: torch.Tensor, backend: Backend, position: int) -> None:
    """NaN or inf logits (damaged weights the load-time check cannot see, or an overflow in
    fp16) would give garbage under greedy decoding and a crash in sampling: stop instead."""
    if not bool(torch.isfinite(logits).all()):
        rows = sorted({int(r) for r in (~torch.isfinite(logits)).nonzero()[:, 0]})
        raise FANformerError(f"{backend.info.path} produced NaN or infinite logits at position {position} "
                             f"(batch rows {rows[:5]}); generation stopped. The model's weights are damaged "
                             f"or overflow in {backend.info.dtype}: try --dtype fp32 or another checkpoint")


def check_prompts(backend: Backend, prompts: Sequence[str], config: GenerationConfig) -> list[list[int]]:
    """The prompts' token ids, or one FANformerError for a prompt that cannot be continued
    (empty, as long as the context, or leaving no room under max_length); a caller that
    echoes prompts checks them first, so a rejected prompt is never printed."""
    if not prompts:
        raise FANformerError("no prompt given")
    prompt_ids = [guarded("the tokenizer failed to encode the prompt", backend.tokenizer.encode, p).ids
                  for p in prompts]
    for prompt, ids in zip(prompts, prompt_ids):
        if not ids:
            raise FANformerError("empty prompt: give some text to continue")
        if len(ids) >= backend.info.max_seq_len:
            raise FANformerError(f"prompt {prompt[:40]!r}... is {len(ids)} tokens, but the model's context is "
                                 f"{backend.info.max_seq_len}; shorten it")
        if config.new_token_budget(len(ids)) < 1:
            raise FANformerError(f"max_length {config.max_length} leaves no room after a {len(ids)}-token prompt")
    return prompt_ids


def _advance(row: _Row, token: int, length: int, tokenizer, info, config: GenerationConfig) -> None:
    if token == info.eos_id:
        row.finish = "eos"
        return
    row.ids.append(token)
    row.text = guarded("the tokenizer failed to decode the output", tokenizer.decode, row.ids,
                       skip_special_tokens=True)
    for stop in config.stop:
        at = row.text.find(stop)
        if at >= 0:
            row.text, row.finish = row.text[:at], "stop"
            return
    if len(row.ids) >= row.budget:
        row.finish = "length"
    elif length >= info.max_seq_len:
        row.finish = "context"


def _stream(row: _Row, index: int, stops: Sequence[str], on_text: Callable[[int, str], None]) -> None:
    end = len(row.text) if row.finish is not None else len(row.text) - _held_back(row.text, stops)
    if end > row.emitted:
        on_text(index, row.text[row.emitted:end])
        row.emitted = end


def reference_greedy(backend: Backend, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step, no cache: the
    reference the cached path is tested against, for any backend."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = backend.score(torch.tensor([ids]))[0, -1:]
        check_logits(logits, backend, len(ids))
        token = int(logits[0].argmax())
        if token == backend.info.eos_id:
            break
        ids.append(token)
        if len(ids) >= backend.info.max_seq_len:
            break
    return ids[len(prompt_ids):]
