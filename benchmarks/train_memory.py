"""Peak training memory of a preset under each set of memory options, and the largest
micro-batch that fits a memory budget.

Each measurement is a fresh process that builds the preset's model and runs `--steps`
steps of `fanformer train`'s own `optimizer_step` (fanformer/training.py) on random
tokens with the options of its row: per-block activation checkpointing, the chunked
LM-head cross-entropy, bitsandbytes' 8-bit AdamW. The peak is, on CUDA,
`torch.cuda.max_memory_allocated` (bf16 autocast, fp32 weights, as training runs), and
on the CPU the process's peak resident memory (`ru_maxrss`: weights, gradients,
optimizer state, activations, the Python and torch runtime and the allocator's slack,
everything the machine must hold). On the CPU a run is capped by an address-space limit
(`--limit-gib`, default the machine's RAM), so a set that does not fit fails with an
allocation error instead of waking the kernel's OOM killer; it is reported as "over".

The largest micro-batch under `--budget-gib` is predicted from the peaks at two batch
sizes: activations grow linearly with the batch, the rest (weights, gradients, optimizer
state) does not, so peak(b) = fixed + b * per_sequence. The "state" column is that fixed
part counted by hand: 4 bytes per parameter each for weights and gradients, plus AdamW's
8 (two fp32 moments) or the 8-bit AdamW's 2 (two uint8 moments; tensors under 4096
values keep fp32 moments).

    python benchmarks/train_memory.py tiny --steps 2                                  # smoke run
    python benchmarks/train_memory.py paper-1b --seq-len 2048 --steps 2 --batch-sizes 1 2
    python benchmarks/train_memory.py paper-1b --sets checkpoint+chunk+8bit --batch-sizes 1

Nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters
from fanformer.training import (Dist, TrainConfig, batch_starts, build_optimizer, optimizer_step,
                                use_memory_options)

GIB = 2**30
LOSS_CHUNK = 1024  # positions per cross-entropy chunk: 1024 x 50304 fp32 logits are 197 MiB
# Option sets, each a TrainConfig override, from none to all.
OPTION_SETS = {
    "plain": {},
    "checkpoint": {"activation_checkpointing": True},
    "checkpoint+chunk": {"activation_checkpointing": True, "loss_chunk": LOSS_CHUNK},
    "checkpoint+chunk+8bit": {"activation_checkpointing": True, "loss_chunk": LOSS_CHUNK, "optimizer": "adamw8bit"},
}


def state_bytes(model: FANformer, optimizer: str) -> int:
    """Weights + gradients + optimizer moments, counted by hand (fp32 weights and gradients)."""
    params = list({id(p): p for p in model.parameters()}.values())
    n = sum(p.numel() for p in params)
    if optimizer == "adamw8bit":
        moments = sum(2 * p.numel() if p.numel() >= 4096 else 8 * p.numel() for p in params)
    else:
        moments = 8 * n
    return 8 * n + moments


def measure(preset: str, seq_len: int, batch: int, options: dict, steps: int, device: torch.device,
            where: list[str]) -> dict:
    """One run in this process: peak memory in bytes over `steps` training steps. `where`
    gets the phase in progress, to say where a run that does not fit ran out."""
    where[0] = "building the model"
    config = FANformerConfig.from_name(preset)
    train = TrainConfig(batch_size=batch, seq_len=seq_len, max_steps=steps, warmup_steps=0, **options)
    torch.manual_seed(0)
    model = FANformer(config).to(device).train()
    use_memory_options(model, train)
    optimizer = build_optimizer(model, train, device)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=4 * batch * seq_len + 1, dtype=np.int64)
    t0 = time.perf_counter()
    for step in range(steps):
        where[0] = f"step {step + 1}"
        starts = batch_starts(len(tokens), seq_len, batch, seed=0, step=step)
        loss, _ = optimizer_step(model, model, optimizer, tokens, starts, seq_len, train, Dist(), device)
        loss = loss.item()  # waits for the device, so the peak below covers the whole step
    seconds = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak": peak, "state": state_bytes(model, train.optimizer), "params": count_parameters(model),
            "loss": loss, "seconds_per_step": seconds}


def child(spec: dict) -> None:
    """Entry point of one measuring process; prints one JSON line."""
    device = torch.device(spec["device"])
    if device.type == "cpu" and spec["limit_gib"]:
        limit = int(spec["limit_gib"] * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    where = ["starting"]
    try:
        result = measure(spec["preset"], spec["seq_len"], spec["batch"], spec["options"], spec["steps"], device, where)
    except (MemoryError, torch.OutOfMemoryError) as err:
        result = {"over": f"{type(err).__name__} in {where[0]}"}
    except RuntimeError as err:  # the CPU allocator reports a refused allocation as a RuntimeError
        if "alloc" not in str(err).lower() and "memory" not in str(err).lower():
            raise
        result = {"over": f"allocation refused in {where[0]}"}
    print(json.dumps(result))


def run_child(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == -9:  # SIGKILL: the machine ran out of RAM before the run reached its cap
        return {"over": "killed by SIGKILL (the kernel's OOM killer: the machine's free RAM ran out first)"}
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"over": f"exit {proc.returncode}: {last}"}
    return json.loads(lines[-1])


def largest_batch(points: dict[int, dict], budget: float) -> tuple[str, float | None, float | None]:
    """(largest micro-batch under budget, fixed bytes, bytes per sequence) from two measured
    batches. Where the peak did not grow with the batch (the CPU's resident peak can be set
    by a phase the batch does not change, or move with the allocator), there is no line to
    extend: the answer is ">= " the largest measured batch that fit, and no fit."""
    fitted = {b: r["peak"] for b, r in points.items() if "peak" in r}
    if not fitted:
        return "0", None, None
    if len(fitted) < 2:
        b, peak = next(iter(fitted.items()))
        return (f">= {b}" if peak <= budget else f"< {b}"), None, None
    (b1, p1), (b2, p2) = sorted(fitted.items())[:2]
    if p2 <= p1:
        under = [b for b, peak in fitted.items() if peak <= budget]
        return (f">= {max(under)}" if under else f"< {b1}"), None, None
    per_sequence = (p2 - p1) / (b2 - b1)
    fixed = p1 - b1 * per_sequence
    return str(max(0, math.floor((budget - fixed) / per_sequence))), fixed, per_sequence


def machine_ram() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=list(PRESETS))
    parser.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2],
                        help="micro-batches to measure (two or more give the largest batch in the budget)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement (the 2nd has "
                        "the optimizer state and the gradients at once)")
    parser.add_argument("--sets", nargs="+", choices=list(OPTION_SETS), default=list(OPTION_SETS),
                        help="option sets to measure (default all)")
    parser.add_argument("--budget-gib", type=float, default=22.0, help="memory budget for the largest batch")
    parser.add_argument("--limit-gib", type=float, help="CPU: address-space cap of each run (default: the RAM)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.seq_len = args.seq_len or PRESETS[args.preset]["max_seq_len"]
    if args.seq_len > PRESETS[args.preset]["max_seq_len"]:
        parser.error(f"--seq-len {args.seq_len} exceeds {args.preset}'s max_seq_len")
    if min(args.batch_sizes) <= 0 or args.steps <= 0:
        parser.error("--batch-sizes and --steps must be positive")
    args.limit_gib = args.limit_gib if args.limit_gib is not None else machine_ram()
    return args


def main() -> None:
    if "--child" in sys.argv:
        child(json.loads(sys.argv[sys.argv.index("--child") + 1]))
        return
    args = parse_args()
    budget = args.budget_gib * GIB
    rows = {}
    for name in args.sets:
        points = {}
        for batch in sorted(set(args.batch_sizes)):
            spec = {"preset": args.preset, "seq_len": args.seq_len, "batch": batch, "options": OPTION_SETS[name],
                    "steps": args.steps, "device": args.device, "limit_gib": args.limit_gib}
            points[batch] = run_child(spec, args.timeout)
            print(f"# {name} batch {batch}: {json.dumps(points[batch])}", file=sys.stderr, flush=True)
            if "over" in points[batch]:
                break  # a larger batch will not fit either
        fits, fixed, per_sequence = largest_batch(points, budget)
        rows[name] = {"points": points, "largest_batch": fits, "fixed": fixed, "per_sequence": per_sequence}

    where = "peak resident memory" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    if args.json:
        print(json.dumps({"preset": args.preset, "seq_len": args.seq_len, "device": device_name(args.device),
                          "torch": torch.__version__, "measure": where, "steps": args.steps,
                          "budget_gib": args.budget_gib, "limit_gib": args.limit_gib, "rows": rows}, indent=2))
        return
    print(f"{device_name(args.device)} | torch {torch.__version__} | {args.preset} at seq {args.seq_len} | "
          f"{args.steps} steps | {where} | budget {args.budget_gib:g} GiB"
          + (f" | runs capped at {args.limit_gib:.1f} GiB" if args.device == "cpu" else ""))
    batches = sorted(set(args.batch_sizes))
    header = (f"{'options':<22} | " + " | ".join(f"{f'peak b={b}':>11}" for b in batches)
              + f" | {'state':>9} | {'per seq':>9} | {'s/step':>7} | {'largest b':>9}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = []
        for b in batches:
            r = row["points"].get(b)
            cell = "-" if r is None else "over" if "over" in r else f"{r['peak'] / GIB:.2f} GiB"
            cells.append(f"{cell:>11}")
        first = next((r for r in row["points"].values() if "peak" in r), None)
        state = f"{first['state'] / GIB:.2f} GiB" if first else "-"
        per = f"{row['per_sequence'] / GIB:.2f} GiB" if row["per_sequence"] else "-"
        secs = f"{first['seconds_per_step']:.1f}" if first else "-"
        print(f"{name:<22} | " + " | ".join(cells) + f" | {state:>9} | {per:>9} | {secs:>7} | {row['largest_batch']:>9}")
    for name, row in rows.items():
        for b, r in row["points"].items():
            if "over" in r:
                print(f"{name} at b={b} did not fit: {r['over']}")
    print("largest b: the largest micro-batch whose predicted peak (fixed + b x per seq, from the two smallest "
          f"measured batches) is under {args.budget_gib:g} GiB; '>= b' where the peak did not grow with the "
          "batch (it is set by something else: measure larger batches)")


if __name__ == "__main__":
    try:
        main()
    except FANformerError as err:
        sys.exit(f"error: {err}")
