"""Drift budgets: limits on a variant's |ppl change| (`max_ppl_change`, a fraction), mean KL
(`max_kl_mean`, nats) and top-1 agreement (`min_top1`, a fraction), by variant name; a
budget file (JSON, keys starting with "_" are comments) overrides the defaults variant by
variant. The defaults depend on the nominal bits only and are loose: they catch a broken
exporter or quantizer, not a slightly worse one (tests/drift_budget.json holds tight ones).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fanformer.errors import FANformerError
from fanformer.runtime.variants import VARIANTS

if TYPE_CHECKING:
    from fanformer.runtime.drift_table import DriftTable

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
