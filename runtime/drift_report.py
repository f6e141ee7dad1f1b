"""The drift table's reports: drift.md (the table), drift.png (mean KL against file size,
one labelled point per measured variant) and drift.json, each written to a temporary name
and renamed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fanformer.runtime.drift_table import DriftTable, Row

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "drift.json", "drift.md", "drift.png"


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
    from fanformer.outputs import write_file_atomically

    write_file_atomically(out / JSON_FILE, lambda tmp: tmp.write_text(json.dumps(table.to_dict(), indent=2)))
    write_file_atomically(out / MARKDOWN_FILE, lambda tmp: tmp.write_text(markdown(table)))
    write_file_atomically(out / PLOT_FILE, lambda tmp: plot(table, tmp))


def best_row(table: DriftTable, bits: int = 4) -> Row | None:
    """The measured `bits`-bit variant closest to the reference (lowest mean KL), if any."""
    rows = [r for r in table.rows if r.measured and r.bits == bits and r.status != "failed"]
    return min(rows, key=lambda r: r.drift["kl_mean"], default=None)
