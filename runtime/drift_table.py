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
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fanformer.errors import FANformerError
from runtime.backend import Backend
from runtime.variants import DEFAULT_VARIANTS, VARIANTS, BuildContext, check_names

log = logging.getLogger(__name__)

JSON_FILE, MARKDOWN_FILE, PLOT_FILE, ARTIFACTS = "drift.json", "drift.md", "drift.png", "artifacts"
DEFAULT_MAX_TOKENS = 8192
REFERENCE_MEMO_BYTES = 1 << 30  # reference logits kept across variants; beyond this, recomputed
PROMPT_LEN, DECODE_STEPS, REPEATS = 64, 32, 3
LIMITS = {"max_ppl_change": "abs ppl change", "max_kl_mean": "mean KL", "min_top1": "top-1 agreement"}
# By nominal bits: 16-bit formats round weights the reference already rounded to fp16
# (drift is compute precision only); 4-bit ones are the loosest.
DEFAULT_BUDGETS = {
    32: {"max_ppl_change": 0.005, "max_kl_mean": 0.002, "min_top1": 0.97},
    16: {"max_ppl_change": 0.01, "max_kl_mean": 0.005, "min_top1": 0.95},
    8: {"max_ppl_change": 0.03, "max_kl_mean": 0.02, "min_top1": 0.90},
    5: {"max_ppl_change": 0.06, "max_kl_mean": 0.05, "min_top1": 0.85},
    4: {"max_ppl_change": 0.12, "max_kl_mean": 0.12, "min_top1": 0.70},
}


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
    calib_samples: int = 128
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


# --- Budgets ----------------------------------------------------------------------------

def check_budget_entry(where: str, entry) -> dict:
    if not isinstance(entry, dict) or not entry:
        raise FANformerError(f"{where} must be an object with one or more of {', '.join(LIMITS)}, got {entry!r}")
    for key, value in entry.items():
        if key not in LIMITS:
            raise FANformerError(f"{where}: unknown limit {key!r}; use {', '.join(LIMITS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise FANformerError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
        if key == "min_top1" and value > 1:
            raise FANformerError(f"{where}: min_top1 is a fraction in [0, 1], got {value!r}")
    return {k: float(v) for k, v in entry.items()}


def load_budgets(path: str | Path) -> dict[str, dict]:
    """A budget file: {"variant": {"max_ppl_change": 0.02, "max_kl_mean": 0.01, "min_top1": 0.9}, ...};
    keys starting with "_" are comments. Every problem is one FANformerError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise FANformerError(f"cannot read the budget file {path} ({err.strerror})") from None
    except ValueError as err:
        raise FANformerError(f"budget file {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FANformerError(f"budget file {path} must hold a JSON object of variant name -> limits, "
                             f"got {type(data).__name__}")
    budgets = {}
    for name, entry in data.items():
        if name.startswith("_"):
            continue
        if name not in VARIANTS:
            raise FANformerError(f"budget file {path}: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        budgets[name] = check_budget_entry(f"budget file {path}: {name}", entry)
    return budgets


def default_budget(name: str) -> dict:
    bits = VARIANTS[name].bits
    return DEFAULT_BUDGETS[min((b for b in DEFAULT_BUDGETS if b >= bits), default=max(DEFAULT_BUDGETS))]


def budget_breaches(drift: dict, budget: dict) -> list[str]:
    """What a measured drift exceeds in `budget`, in words ("mean KL 0.031 > 0.02")."""
    values = {"max_ppl_change": abs(drift["ppl_change"]), "max_kl_mean": drift["kl_mean"],
              "min_top1": drift["top1_agreement"]}
    out = []
    for key, limit in budget.items():
        value = values[key]
        # A NaN (a model gone non-finite) breaches every limit.
        bad = not value >= limit if key == "min_top1" else not value <= limit
        if bad:
            out.append(f"{LIMITS[key]} {value:.4g} {'<' if key == 'min_top1' else '>'} {limit:.4g}")
    return out


def apply_budgets(table: DriftTable, budgets: dict[str, dict] | None = None) -> DriftTable:
    """Set every measured row's status from its budget: `budgets[name]` if given, else the default."""
    for row in table.rows:
        if not row.measured or row.status in ("failed", "skipped"):
            continue
        row.budget = (budgets or {}).get(row.variant) or default_budget(row.variant)
        breaches = budget_breaches(row.drift, row.budget)
        row.status, row.reason = ("over budget", "; ".join(breaches)) if breaches else ("ok", "")
    return table


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
    from runtime import drift, load_backend

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
    from runtime import eval_tokens, fp16_reference, perplexity
    from runtime.perplexity import check_ctx

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


# --- Decode speed and peak memory, one process per variant --------------------------------

def time_decode_in_child(path: Path, options: dict, steps: int, threads: int) -> dict:
    """Run `decode_child` in a new interpreter on this artifact; its JSON result."""
    spec = {"path": str(path), "options": options, "steps": steps, "threads": threads}
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this very project
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", "from runtime.drift_table import decode_child; decode_child()",
                           json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise FANformerError(f"the timing process exited with {done.returncode}: {lines[-1] if lines else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (Linux VmHWM; ru_maxrss would carry the parent's
    peak over the exec). None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_tokens_per_s(backend: Backend, steps: int, repeats: int = REPEATS) -> float:
    """Greedy batch-1 decode after a PROMPT_LEN prompt of seeded random tokens: steps per
    second of the fastest of `repeats` runs, after one warmup run."""
    info = backend.info
    length = max(1, min(PROMPT_LEN, info.max_seq_len - steps - 1))
    prompt = torch.randint(0, info.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        cache = backend.new_cache(1)
        mask = torch.ones_like(prompt)
        token = backend.prefill(cache, prompt, mask)[:, -1].argmax(-1, keepdim=True).cpu()
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            token = backend.decode(cache, token, mask)[:, -1].argmax(-1, keepdim=True).cpu()
        return time.perf_counter() - start

    run()
    return steps / min(run() for _ in range(repeats))


def decode_child() -> None:
    """Entry point of the timing process: argv[1] is the JSON spec; prints one JSON line."""
    from runtime import load_backend

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    try:
        backend = load_backend(spec["path"], **spec["options"])
        speed = decode_tokens_per_s(backend, spec["steps"])
    except FANformerError as err:
        sys.exit(f"error: {err}")
    print(json.dumps({"decode_tokens_per_s": speed, "peak_rss_bytes": peak_rss_bytes()}))


# --- Reports ------------------------------------------------------------------------------

def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, fmt)


def verdict(row: Row) -> str:
    return f"{row.status}: {row.reason}" if row.reason else row.status


COLUMNS = ("variant", "format", "method", "bits", "size MB", "ppl", "ppl change", "mean KL", "top-1",
           "decode tok/s", "peak RSS MiB", "verdict")


def row_cells(row: Row) -> list[str]:
    d, s = row.drift or {}, row.speed or {}
    return [row.variant, row.format, row.method, str(row.bits), _num(row.file_bytes, ".2f", 1e-6),
            _num(d.get("model", {}).get("ppl"), ".3f"), _num(d.get("ppl_change"), "+.2f", 100) + ("%" if d else ""),
            _num(d.get("kl_mean"), ".3g"), _num(d.get("top1_agreement"), ".1f", 100) + ("%" if d else ""),
            _num(s.get("decode_tokens_per_s"), ",.0f"), _num(s.get("peak_rss_bytes"), ",.0f", 2 ** -20),
            verdict(row).replace("|", "/")]


def markdown(table: DriftTable) -> str:
    p, ref = table.protocol, table.reference
    stride = f", stride {p['stride']}" if p.get("stride") else ""
    lines = [f"Drift of `{table.checkpoint}` against its FP16 reference ({p['reference']}): "
             f"ppl {ref['ppl']:.3f} ± {ref['ppl_stderr']:.3f} on {p['tokens']:,} tokens of the {p['split']} split "
             f"({p['protocol']}, ctx {p['ctx']}{stride}).", ""]
    if p.get("decode"):
        dec = p["decode"]
        lines[0] += (f" Decode: batch 1, {dec['steps']} greedy steps after a {dec['prompt_len']}-token prompt, "
                     f"best of {dec['repeats']}, {dec['threads']} thread(s); peak RSS of a fresh process per variant.")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in table.rows]
    lines += ["", f"**{'PASS' if table.passed else 'FAIL'}**: {len(table.rows)} variant{'s' * (len(table.rows) != 1)}, "
              + ", ".join(f"{sum(r.status == s for r in table.rows)} {s}"
                          for s in ("ok", "over budget", "failed", "skipped"))]
    return "\n".join(lines) + "\n"


def plot(table: DriftTable, path: Path) -> None:
    """Mean KL against file size, one labelled point per measured variant (Agg, no display).
    The KL axis is linear below 1e-7 (16/32-bit variants sit there, some at 0) and
    logarithmic above; labels of nearby points are stacked so that they stay readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = sorted((r for r in table.rows if r.measured and r.file_bytes),
                  key=lambda r: (r.file_bytes, -r.drift["kl_mean"]))
    for fmt in dict.fromkeys(r.format for r in rows):
        mine = [r for r in rows if r.format == fmt]
        ax.scatter([r.file_bytes / 1e6 for r in mine], [r.drift["kl_mean"] for r in mine], label=fmt, s=30)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-7)
    ax.set_ylim(0, 4 * max([r.drift["kl_mean"] for r in rows] + [1e-6]))  # room for the top labels
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if str(x)[0] in "25" else ""))
    ax.autoscale_view()
    placed = []  # display coordinates of the labels so far
    for r in rows:
        x, y = r.file_bytes / 1e6, r.drift["kl_mean"]
        px, py = ax.transData.transform((x, y))
        shift = 0
        while any(abs(px - qx) < 70 and abs(py - 10 * shift - qy) < 9 for qx, qy in placed):
            shift += 1
        placed.append((px, py - 10 * shift))
        ax.annotate(r.variant + ("" if r.status == "ok" else f" ({r.status})"), (x, y), textcoords="offset points",
                    xytext=(5, 2 - 7.5 * shift), fontsize=7, color="black" if r.status == "ok" else "red")
    ax.set_xlabel("file size on disk (MB)")
    ax.set_ylabel("mean KL(FP16 reference || variant), nats/token")
    ax.set_title(f"{Path(table.checkpoint).name}: drift against size "
                 f"({table.protocol['tokens']:,} {table.protocol['split']} tokens)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="center right")
    fig.savefig(path, format="png", dpi=120)


def write_outputs(table: DriftTable, out: Path) -> None:
    from export.gguf_export import write_file_atomically

    write_file_atomically(out / JSON_FILE, lambda tmp: tmp.write_text(json.dumps(table.to_dict(), indent=2)))
    write_file_atomically(out / MARKDOWN_FILE, lambda tmp: tmp.write_text(markdown(table)))
    write_file_atomically(out / PLOT_FILE, lambda tmp: plot(table, tmp))


def best_row(table: DriftTable, bits: int = 4) -> Row | None:
    """The measured `bits`-bit variant closest to the reference (lowest mean KL), if any."""
    rows = [r for r in table.rows if r.measured and r.bits == bits and r.status != "failed"]
    return min(rows, key=lambda r: r.drift["kl_mean"], default=None)
