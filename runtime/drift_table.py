"""The drift table: one trained checkpoint taken through every variant of
runtime/variants.py, each measured on the same held-out tokens with the same protocol
against the checkpoint's FP16 reference, and checked against drift budgets. It answers
"which file do I ship, and what does it cost me?".

Columns, per variant:

- ppl, ppl change, mean KL(reference || variant), top-1 agreement: the `Drift` that
  `runtime.drift(variant, reference, tokens)` returns, stored whole in drift.json; no
  number is recomputed here, so the table says what `fanformer eval --reference` says.
  The reference (`runtime.fp16_reference`) is loaded once. Every variant is scored on the
  same windows, so its logits are kept per window (`ReferenceMemo`, up to a memory
  bound) instead of being recomputed twenty times; the values are the same tensors.
- file size: the bytes on disk of the artifact (every file of a folder: weights,
  tokenizer and configs, what one ships).
- decode tokens/s and peak resident memory: measured in a fresh Python process per
  variant, so the peak (Linux's VmHWM) is that variant's own (its runtime and weights,
  plus the interpreter and torch every row shares), not the table process's. The child
  loads the artifact, prefills a prompt of random tokens and times greedy decode steps
  at batch 1 through the backend interface: the fastest of 3 runs after a warmup, as
  benchmarks/decode.py does (shorter: the table's concern is the comparison).

Verdicts: `ok`, `over budget` (with what was exceeded), `failed` (a build, load,
scoring or timing error: the reason is recorded, the exception logged, and the table
goes on), `skipped` (the machine cannot run the variant, with the reason: never
silently). The table passes when no row is over budget or failed.

Budgets map a variant name to limits on |ppl change| (`max_ppl_change`, a fraction),
mean KL (`max_kl_mean`, nats) and top-1 agreement (`min_top1`, a fraction); a budget
file (JSON, keys starting with "_" are comments) overrides the defaults variant by
variant. The defaults (`DEFAULT_BUDGETS`) depend on the nominal bits only and are loose,
a few times what the quickstart model measures (4-bit: KL 0.02-0.05, top-1 80-88%): they
catch a broken exporter or quantizer, not a slightly worse one. tests/drift_budget.json
holds tight budgets measured on the regression suite's model.

Outputs in the output folder: drift.json, drift.md (the table), drift.png (mean KL
against file size, one labelled point per measured variant), each written to a
temporary name and renamed; artifacts/ keeps every built variant, ready to ship.

The parts live beside this module: budgets (runtime/drift_budgets.py), the decode timing
child process (runtime/decode_timing.py) and the reports (runtime/drift_report.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fanformer.errors import FANformerError
from fanformer.quant.config import CalibratedConfig
from fanformer.runtime.backend import Backend
from fanformer.runtime.decode_timing import DECODE_STEPS, PROMPT_LEN, REPEATS, time_decode_in_child
from fanformer.runtime.drift_budgets import apply_budgets
from fanformer.runtime.drift_report import write_outputs
from fanformer.runtime.variants import DEFAULT_VARIANTS, VARIANTS, BuildContext, check_names

log = logging.getLogger(__name__)

ARTIFACTS = "artifacts"  # the built variants, in the output folder
DEFAULT_MAX_TOKENS = 8192
REFERENCE_MEMO_BYTES = 1 << 30  # reference logits kept across variants; beyond this, recomputed
@dataclass(frozen=True)
class TableConfig:
    """How the table is measured. ctx None: min(512, the model's max_seq_len), stride
    ctx/2 (the sliding protocol of runtime/perplexity.py); max_tokens None: the whole split.
    threads: torch's and onnxruntime's threads for scoring and timing. One by default: a
    batch-1 decode of these models gains little from a second core, and on a shared machine
    a spinning second OpenMP thread can make a run many times slower, so one thread gives
    the figures that reproduce."""

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    split: str = "test"
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    ctx: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    calib_samples: int = CalibratedConfig.calib_samples  # GPTQ/AWQ windows; the methods' own default
    speed: bool = True
    decode_steps: int = DECODE_STEPS
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", check_names(self.variants))
        for name in ("max_tokens", "ctx"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise FANformerError(f"{name} must be an integer >= 2, got {value!r}")
        for name in ("batch_size", "calib_samples", "decode_steps", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FANformerError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Row:
    variant: str
    format: str
    method: str
    bits: int
    status: str = "pending"  # ok | over budget | failed | skipped
    reason: str = ""
    path: str | None = None
    device: str | None = None
    file_bytes: int | None = None
    drift: dict | None = None  # runtime.Drift.to_dict(), as the evaluator returned it
    speed: dict | None = None  # decode_tokens_per_s, peak_rss_bytes, ... (decode_child)
    budget: dict | None = None
    build_s: float | None = None
    eval_s: float | None = None

    @property
    def measured(self) -> bool:
        return self.drift is not None

    def fail(self, stage: str, err: Exception) -> None:
        self.status, self.reason = "failed", f"{stage}: {describe(err)}"
        # A user-level error is its message; anything else may be a bug, so keep its traceback.
        log.warning("%s failed (%s)", self.variant, self.reason,
                    exc_info=None if isinstance(err, FANformerError) else err)


def describe(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if isinstance(err, FANformerError) else f"{type(err).__name__}: {text}"
    return text[:300]


@dataclass
class DriftTable:
    checkpoint: str
    out: str  # the folder of drift.json, drift.md, drift.png and artifacts/
    reference: dict  # the reference's Perplexity on the tokens
    protocol: dict
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.breaches

    @property
    def breaches(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("over budget", "failed")]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.variant == name)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "out": self.out, "reference": self.reference, "protocol": self.protocol,
                "passed": self.passed, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> "DriftTable":
        return cls(data["checkpoint"], data["out"], data["reference"], data["protocol"],
                   [Row(**r) for r in data["rows"]])


# --- The reference, scored once per window -----------------------------------------------

class ReferenceMemo(Backend):
    """A backend whose `score` returns what the wrapped one returned for the same input
    the first time (kept up to `max_bytes`, recomputed beyond). Deterministic either way."""

    def __init__(self, backend: Backend, max_bytes: int = REFERENCE_MEMO_BYTES):
        self.backend, self.max_bytes, self.bytes = backend, max_bytes, 0
        self.info, self.tokenizer = backend.info, backend.tokenizer
        self.memo: dict[tuple, torch.Tensor] = {}

    def new_cache(self, batch_size: int):
        return self.backend.new_cache(batch_size)

    def forward(self, input_ids, attention_mask, cache):
        return self.backend.forward(input_ids, attention_mask, cache)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        key = (tuple(input_ids.shape), input_ids.numpy().tobytes())
        if key in self.memo:
            return self.memo[key]
        logits = self.backend.score(input_ids)
        if self.bytes + logits.nbytes <= self.max_bytes:
            self.memo[key], self.bytes = logits, self.bytes + logits.nbytes
        return logits


# --- Measuring ----------------------------------------------------------------------------

def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_output(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an existing non-empty folder without --force; with it, drop the old artifacts."""
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve() in out.resolve().parents:
        raise FANformerError(f"--out {out} must be outside the checkpoint {checkpoint}")
    if out.exists() and not out.is_dir():
        raise FANformerError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FANformerError(f"{out} already holds files (a previous drift table?); choose another --out, "
                                 "or pass --force to replace its table and artifacts")
        shutil.rmtree(out / ARTIFACTS, ignore_errors=True)
    (out / ARTIFACTS).mkdir(parents=True, exist_ok=True)


def check_float_checkpoint(checkpoint: Path) -> None:
    from fanformer.checkpoint import load_config, read_quantization_config

    load_config(checkpoint)  # a clear error for a missing or incomplete checkpoint
    if read_quantization_config(checkpoint) is not None:
        raise FANformerError(f"{checkpoint} is a quantized checkpoint; give the float checkpoint it came from "
                             "(the table builds every quantized variant itself)")


def measure_variant(row: Row, context: BuildContext, reference: Backend, tokens, config: TableConfig,
                    ctx: int) -> None:
    """Build, score and time one variant into `row`; any failure is recorded, not raised."""
    from fanformer.runtime import drift, load_backend

    variant = VARIANTS[row.variant]
    try:
        reason = variant.requires()
    except Exception as err:  # e.g. a runtime that is installed but broken
        row.fail("requirements", err)
        return
    if reason:
        row.status, row.reason = "skipped", reason
        log.info("%s skipped: %s", row.variant, reason)
        return
    start = time.perf_counter()
    try:
        path = context.artifact(row.variant)
    except Exception as err:  # a variant that cannot be built is a row, not the end of the table
        row.fail("build", err)
        return
    row.build_s, row.path, row.file_bytes = time.perf_counter() - start, str(path), disk_bytes(path)
    options = variant.load_options(config.device, config.threads)
    row.device = options["device"]
    start = time.perf_counter()
    try:
        backend = load_backend(path, **options)
        row.drift = drift(backend, reference, tokens, ctx=ctx, batch_size=config.batch_size).to_dict()
    except Exception as err:
        row.fail("evaluation", err)
        return
    finally:
        backend = None
        gc.collect()
    row.eval_s = time.perf_counter() - start
    if config.speed:
        try:
            row.speed = time_decode_in_child(path, options, config.decode_steps, config.threads)
        except Exception as err:
            row.fail("decode timing", err)


def run_drift_table(checkpoint: str | Path, out: str | Path | None = None, config: TableConfig = TableConfig(),
                    data: list[str] | None = None, budgets: dict[str, dict] | None = None,
                    cache_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> DriftTable:
    """Build and measure every variant of `config` for `checkpoint`, check the budgets,
    and write drift.json / drift.md / drift.png into `out` (default `<checkpoint>-drift`)."""
    with torch_threads(config.threads):
        return _run(checkpoint, out, config, data, budgets, cache_dir, force, progress)


def _run(checkpoint, out, config: TableConfig, data, budgets, cache_dir, force: bool, progress: bool) -> DriftTable:
    from fanformer.runtime import eval_tokens, fp16_reference, perplexity
    from fanformer.runtime.perplexity import check_ctx

    checkpoint = Path(checkpoint)
    check_float_checkpoint(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.name}-drift")
    prepare_output(out, checkpoint, force)
    reference = ReferenceMemo(fp16_reference(checkpoint, device=config.device))
    ctx = config.ctx or min(512, reference.info.max_seq_len)
    check_ctx(reference, ctx)
    tokens = eval_tokens(reference.tokenizer, data, config.split, config.max_tokens, cache_dir)
    ref_ppl = perplexity(reference, tokens, ctx=ctx, batch_size=config.batch_size)
    context = BuildContext(checkpoint, out / ARTIFACTS, data=data, cache_dir=Path(cache_dir) if cache_dir else None,
                           calib_samples=config.calib_samples)
    table = DriftTable(str(checkpoint), str(out), ref_ppl.to_dict(), protocol_of(config, ctx, ref_ppl, reference))
    bar = tqdm(config.variants, desc="drift", unit="variant", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        variant = VARIANTS[name]
        row = Row(name, variant.format, variant.method, variant.bits)
        measure_variant(row, context, reference, tokens, config, ctx)
        table.rows.append(row)
        apply_budgets(table, budgets)
        log.info("%s: %s%s", name, row.status, f" ({row.reason})" if row.reason else "")
    write_outputs(table, out)
    return table


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def protocol_of(config: TableConfig, ctx: int, ref_ppl, reference: Backend) -> dict:
    return {"split": config.split, "tokens": ref_ppl.tokens, "protocol": ref_ppl.protocol, "ctx": ctx,
            "stride": ref_ppl.stride, "batch_size": config.batch_size, "device": config.device,
            "reference": f"{reference.info.format} {reference.info.dtype} on {reference.info.device}",
            "calib_samples": config.calib_samples,
            "decode": {"prompt_len": PROMPT_LEN, "steps": config.decode_steps, "repeats": REPEATS,
                       "batch_size": 1, "threads": config.threads} if config.speed else None}
