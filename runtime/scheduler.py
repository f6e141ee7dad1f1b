"""Continuous batching for the server: sequences that arrive together decode together.

One worker thread owns the backend. Between decode steps it lets finished and cancelled
sequences leave the batch and admits waiting ones: those are prefilled together (left
padded, as `generate` batches prompts), and their rows are joined with the running
batch's into one KV cache (`Backend.join_caches`), trimmed to the longest sequence
left. Then every sequence decodes one token in one forward call. This is the iteration-
level scheduling of Orca (Yu et al., OSDI 2022) over left-padded caches instead of
paged ones. A backend that cannot join caches (`Backend.batching` false) serves one
sequence at a time, in order of arrival.

Each sequence samples exactly as `runtime.generate` does for one prompt (the same logit
processors, a generator seeded with its seed, the same stop and length rules), so a
completion equals `generate(backend, [prompt], config)` whatever it was batched with, up
to the float rounding of a padded batch.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fanformer.errors import FANformerError
from fanformer.runtime.backend import Backend
from fanformer.runtime.generation import GenerationConfig, check_logits, next_tokens, process_logits
# The per-sequence bookkeeping of `generate` itself, so that stop strings, budgets and the
# text streamed behave exactly as there.
from fanformer.runtime.generation import _advance, _Row, _stream

log = logging.getLogger(__name__)


class QueueFull(FANformerError):
    """The waiting queue cannot take the request now; it may succeed later (HTTP 503)."""


@dataclass
class TokenInfo:
    """One sampled token: its id, its log-probability under the model's distribution
    (before temperature and filtering) and the `top` most likely tokens' (id, logprob)."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the worker reports for one sequence: new text, the tokens behind it, and the
    finish reason ("eos", "stop", "length", "context") once it ends, or an error."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    internal: bool = False  # the error is a bug, not the request's fault


class Sequence:
    """One prompt continued under one config: a row of the batch while it runs."""

    def __init__(self, index: int, prompt_ids: list[int], config: GenerationConfig, vocab_size: int,
                 logprobs: int | None = None, prompt_logprobs: bool = False):
        self.index = index  # the choice it answers, within its request
        self.prompt_ids = prompt_ids
        self.config = config
        self.logprobs = logprobs  # None: no log-probabilities; k: the chosen token's and the top k
        self.prompt_logprobs = prompt_logprobs  # also every prompt token's (echo with logprobs)
        self.out = _Row(config.new_token_budget(len(prompt_ids)))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.seen = torch.zeros((1, vocab_size), dtype=torch.bool)  # for the repetition penalty
        self.seen[0, prompt_ids] = True
        self.length = len(prompt_ids)  # prompt + sampled tokens (generate's `lengths`)
        self.pending: int | None = None  # the last sampled token, not yet fed to the model
        self.prompt_tokens: list[TokenInfo | None] = []


class Job:
    """One request's sequences and where their events go: `emit(events)` is called from
    the worker thread with each step's events of the job; it must not block."""

    def __init__(self, sequences: list[Sequence], emit: Callable[[list[Event]], None]):
        self.sequences = sequences
        self.emit = emit
        self.cancelled = False


class Scheduler:
    """Runs jobs on `backend` in a worker thread. `max_batch` sequences decode together
    (1 where the backend cannot batch); at most `max_queue` sequences wait, and a job
    that would exceed that is refused with QueueFull."""

    def __init__(self, backend: Backend, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise FANformerError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.backend = backend
        self.max_batch = max_batch if backend.batching else 1
        self.max_queue = max_queue
        self._waiting: deque[tuple[Job, Sequence]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._active: list[tuple[Job, Sequence]] = []
        self._cache = None  # the running batch's KV cache, rows in _active's order
        self._held = 0  # positions the cache holds (the longest sequence; the others left-padded)
        self._thread = threading.Thread(target=self._run, name="fanformer-scheduler", daemon=True)
        self._thread.start()

    # --- The server's side (any thread) -------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(job.sequences) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} sequences are waiting (at most "
                                f"{self.max_queue}); retry later")
            self._waiting.extend((job, s) for s in job.sequences)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job's sequences (its client went away): waiting ones at once, running ones
        before the next decode step."""
        with self._wake:
            job.cancelled = True
            self._waiting = deque(item for item in self._waiting if item[0] is not job)
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"running": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # --- The worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    return
                kept = [(j, s) for j, s in self._active if not j.cancelled and s.out.finish is None]
                room = self.max_batch - len(kept) if self.backend.batching else int(not kept)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._step(kept, admitted)
            except Exception as err:  # a failed step fails its sequences, never the server
                self._fail(kept + admitted, err)
                self._active, self._cache, self._held = [], None, 0

    def _fail(self, rows: list[tuple[Job, Sequence]], err: Exception) -> None:
        if not isinstance(err, FANformerError):
            log.exception("a step of the batch failed", exc_info=err)
        for job, seq in rows:
            if seq.out.finish is None:
                seq.out.finish = "error"
                job.emit([Event(seq.index, error=str(err), internal=not isinstance(err, FANformerError))])

    def _step(self, kept: list[tuple[Job, Sequence]], admitted: list[tuple[Job, Sequence]]) -> None:
        """Let go of finished rows, take the admitted ones in, then one decode step for all."""
        parts = []  # (cache, rows kept, positions held, rows held)
        if kept:
            keep = {id(seq) for _, seq in kept}
            rows = [i for i, (_, seq) in enumerate(self._active) if id(seq) in keep]
            parts.append((self._cache, rows, self._held, len(self._active)))
        if admitted:
            try:
                cache, width = self._prefill(admitted)
            except Exception as err:  # the newcomers fail; the running batch goes on
                self._fail(admitted, err)
                cache, width, admitted = None, 0, []
            rows = [i for i, (_, seq) in enumerate(admitted) if seq.out.finish is None]
            parts.append((cache, rows, width, len(admitted)))
            admitted = [admitted[i] for i in rows]
        self._active = kept + admitted
        parts = [part for part in parts if part[1]]
        if not parts:
            self._cache, self._held = None, 0
            return
        held = max(seq.length - 1 for _, seq in self._active)  # each row has fed all but its pending token
        cache, rows, part_held, part_rows = parts[0]
        if len(parts) > 1 or len(rows) < part_rows or part_held != held:
            cache = self.backend.join_caches([(c, r) for c, r, _, _ in parts], held)
        self._cache, self._held = cache, held
        self._decode()

    def _prefill(self, admitted: list[tuple[Job, Sequence]]):
        """Prefill the admitted prompts together, left-padded; sample each one's first token."""
        info = self.backend.info
        prompts = [s.prompt_ids for _, s in admitted]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), info.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        every = any(s.prompt_logprobs for _, s in admitted)
        cache = self.backend.new_cache(len(prompts))
        logits = self.backend.prefill(cache, input_ids, mask, last_only=not every).float().cpu()
        for i, (_, seq) in enumerate(admitted):
            if seq.prompt_logprobs:
                start = width - len(seq.prompt_ids)
                seq.prompt_tokens = [None] + [self._token_info(logits[i, start + t - 1], seq.prompt_ids[t], seq.logprobs)
                                              for t in range(1, len(seq.prompt_ids))]
        self._sample(admitted, logits[:, -1])
        return cache, width

    def _decode(self) -> None:
        batch = len(self._active)
        tokens = torch.tensor([[s.pending] for _, s in self._active], dtype=torch.long)
        mask = torch.zeros((batch, self._held + 1), dtype=torch.long)
        for i, (_, seq) in enumerate(self._active):
            mask[i, self._held + 1 - seq.length:] = 1  # its prompt and sampled tokens, right-aligned
        logits = self.backend.decode(self._cache, tokens, mask)[:, -1].float().cpu()
        self._held += 1
        self._sample(self._active, logits)

    def _sample(self, rows: list[tuple[Job, Sequence]], logits: torch.Tensor) -> None:
        """`generate`'s step for each row: logits (B, vocab) -> next tokens, text, events.
        Row by row: on (1, vocab) no torch op is large enough to wake its thread pool, which
        on a busy CPU costs milliseconds a call (each row draws from its own generator
        anyway, as in `generate`)."""
        info = self.backend.info
        chosen: dict[int, int] = {}
        for i, (job, seq) in enumerate(rows):
            if not job.cancelled:
                try:  # NaN / inf logits stop this row's request, as `generate` stops
                    check_logits(logits[i:i + 1], self.backend, seq.length)
                except FANformerError as err:
                    self._fail([(job, seq)], err)
                    continue
                processed = process_logits(logits[i:i + 1], seq.config, seq.seen, torch.tensor([seq.length]),
                                           info.eos_id)
                chosen[i] = int(next_tokens(processed, seq.config.temperature, [seq.generator])[0])
        events: dict[int, tuple[Job, list[Event]]] = {}
        for i, token in sorted(chosen.items()):
            job, seq = rows[i]
            seq.seen[0, token] = True
            seq.length += 1
            seq.pending = token
            _advance(seq.out, token, seq.length, self.backend.tokenizer, info, seq.config)
            tokens = [] if seq.logprobs is None or token == info.eos_id else \
                [self._token_info(logits[i], token, seq.logprobs)]
            texts = []
            _stream(seq.out, seq.index, seq.config.stop, lambda _, delta: texts.append(delta))
            if texts or tokens or seq.out.finish is not None:
                events.setdefault(id(job), (job, []))[1].append(Event(seq.index, "".join(texts), tokens, seq.out.finish))
        for job, batch in events.values():
            job.emit(batch)

    @staticmethod
    def _token_info(logits: torch.Tensor, token: int, top: int) -> TokenInfo:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
        best = torch.topk(logprobs, top) if top else None
        return TokenInfo(token, float(logprobs[token]),
                         [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)])
