"""Perplexity through the backend interface, with two protocols.

- "sliding": Hugging Face's strided sliding window ("Perplexity of fixed-length models",
  transformers docs). Windows of `ctx` tokens start every `stride` tokens; each window
  scores only the tokens the previous one did not reach, so every token after the first
  is scored exactly once, with up to ctx - stride tokens of context.
- "chunks": llama.cpp's `llama-perplexity`. The tokens are cut into non-overlapping
  chunks of `ctx`; in each chunk only the second half is scored (logits from position
  ctx/2 on), so every scored token sees at least ctx/2 tokens of context. Numbers are
  comparable with llama.cpp's on the same tokens and ctx.

The standard error is llama.cpp's: ppl * sqrt(var(nll) / (n - 1)) (the delta method on
the mean negative log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fanformer.errors import FANformerError
from fanformer.runtime.backend import Backend

PROTOCOLS = ("sliding", "chunks")
SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class Window:
    """Feed tokens[begin:end]; score the predictions of tokens[first:end] (first > begin)."""

    begin: int
    end: int
    first: int


def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    # stride == ctx would skip each window's first token: it has no context in its window.
    if not 0 < stride < ctx:
        raise FANformerError(f"stride must be in [1, ctx - 1 = {ctx - 1}] so that no token is skipped, got {stride}")
    windows, scored_to = [], 1  # token 0 has nothing before it to be predicted from
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + ctx, n_tokens)
        windows.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def chunk_windows(n_tokens: int, ctx: int) -> list[Window]:
    return [Window(c * ctx, (c + 1) * ctx, c * ctx + ctx // 2 + 1) for c in range(n_tokens // ctx)]


def make_windows(n_tokens: int, protocol: str, ctx: int, stride: int | None) -> list[Window]:
    if protocol not in PROTOCOLS:
        raise FANformerError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if ctx < 2:
        raise FANformerError(f"ctx must be at least 2, got {ctx}")
    windows = sliding_windows(n_tokens, ctx, stride or ctx // 2) if protocol == "sliding" \
        else chunk_windows(n_tokens, ctx)
    if not windows or n_tokens < 2:
        raise FANformerError(f"{n_tokens} tokens are too few for one {protocol} window of ctx {ctx}; "
                             "use more data or a smaller --ctx")
    return windows


def scored_log_probs(backend: Backend, tokens: np.ndarray, windows: list[Window], batch_size: int = 4,
                     progress: bool = False, desc: str = "scoring") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each window in order: log-probabilities (n, vocab) of its scored predictions and
    the n target tokens. Windows of equal length are batched."""
    bar = tqdm(total=sum(w.end - w.first for w in windows), unit="tok", desc=desc, disable=not progress)
    i = 0
    while i < len(windows):
        group = [windows[i]]
        while (i + len(group) < len(windows) and len(group) < batch_size
               and windows[i + len(group)].end - windows[i + len(group)].begin == group[0].end - group[0].begin):
            group.append(windows[i + len(group)])
        ids = torch.from_numpy(np.stack([tokens[w.begin:w.end] for w in group]).astype(np.int64))
        log_probs = torch.log_softmax(backend.score(ids).float().cpu(), dim=-1)  # (B, T, V)
        for row, w in enumerate(group):
            positions = slice(w.first - w.begin - 1, w.end - w.begin - 1)  # logits at t-1 predict token t
            yield log_probs[row, positions], ids[row, w.first - w.begin:]
            bar.update(w.end - w.first)
        i += len(group)
    bar.close()


@dataclass
class Perplexity:
    ppl: float
    ppl_stderr: float
    nll: float
    tokens: int
    protocol: str
    ctx: int
    stride: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_nll(nll: np.ndarray, protocol: str, ctx: int, stride: int | None) -> Perplexity:
    n = len(nll)
    nll = nll.astype(np.float64)  # a float32 mean leaves E[x^2] - mean^2 all rounding error
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float(nll.var()) if n > 1 else 0.0
    stderr = ppl * math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else float("nan")
    return Perplexity(ppl=ppl, ppl_stderr=stderr, nll=mean, tokens=n, protocol=protocol, ctx=ctx,
                      stride=stride if protocol == "sliding" else None)


def check_ctx(backend: Backend, ctx: int) -> None:
    if ctx > backend.info.max_seq_len:
        raise FANformerError(f"--ctx {ctx} is longer than the model's maximum context "
                             f"{backend.info.max_seq_len}; use --ctx {backend.info.max_seq_len} or less")


def perplexity(backend: Backend, tokens: np.ndarray, protocol: str = "sliding", ctx: int = 512,
               stride: int | None = None, batch_size: int = 4, progress: bool = False) -> Perplexity:
    check_ctx(backend, ctx)
    stride = stride or ctx // 2
    windows = make_windows(len(tokens), protocol, ctx, stride)
    nll = [-lp.gather(-1, targets[:, None])[:, 0]
           for lp, targets in scored_log_probs(backend, tokens, windows, batch_size, progress)]
    return summarize_nll(torch.cat(nll).numpy(), protocol, ctx, stride)


# --- Evaluation tokens -------------------------------------------------------------

def eval_tokens(tokenizer, data: list[str] | None = None, split: str = "test", max_tokens: int | None = None,
                cache_dir: str | Path | None = None) -> np.ndarray:
    """The tokens to evaluate on: a held-out split of the corpus (the default corpus when
    `data` is None) through the token cache, or with split="all" the given files whole."""
    from fanformer.data import build_token_cache, default_cache_dir, iter_documents, resolve_files
    from fanformer.tokenizer import special_token_ids

    if split not in SPLITS:
        raise FANformerError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    files = resolve_files(data)
    if split == "all":
        eos = special_token_ids(tokenizer)["eos_token_id"]
        ids: list[int] = []
        for doc in iter_documents(files):
            ids += tokenizer.encode(doc).ids + [eos]
            if max_tokens and len(ids) >= max_tokens:
                break
        tokens = np.array(ids, dtype=np.int64)
    else:
        splits = build_token_cache(files, tokenizer, Path(cache_dir) if cache_dir else default_cache_dir())
        tokens = getattr(splits, split)
        if len(tokens) == 0:
            raise FANformerError(f"the {split} split of this corpus is empty; pass more data, or --split all "
                                 "to score the given files whole")
    return np.asarray(tokens[:max_tokens] if max_tokens else tokens)
