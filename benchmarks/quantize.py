"""Time, peak memory and file size of each quantization method (`fanformer quantize`).

Each method runs in a fresh Python process on the same checkpoint, through the same entry
point as the CLI (`quant.checkpoint.quantize_checkpoint`), so its peak resident memory
(VmHWM) is its own: the float model, the calibration activations and whatever the method
keeps. The time is the method's own (`report["seconds"]`: searching, Hessians, rounding,
packing); loading and saving are in the wall time beside it. Calibration windows come
from the default corpus's training split, tokenized once before the first method so that
no method pays for building the token cache.

For a preset the model is randomly initialised (time and memory do not depend on the
weights); pass a trained checkpoint as PATH to quantize that instead.

    python benchmarks/quantize.py --preset small
    python benchmarks/quantize.py --preset seed-92m --calib-samples 8 --group-size 64 --keep 'blocks.*.attn.fan.proj.lora_b'
    python benchmarks/quantize.py runs/quickstart --methods rtn gptq awq

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from decode import peak_rss_bytes
from decode_formats import random_checkpoint
from fanformer.checkpoint import WEIGHTS_FILE, load_config
from fanformer.config import PRESETS

METHODS = ("rtn", "gptq", "awq", "int8", "nf4")
CALIBRATED = ("gptq", "awq")
INTEGER = ("rtn", "gptq", "awq")


def method_config(method: str, args):
    from fanformer.quant import methods

    known = methods()
    if method not in known:
        raise SystemExit(f"method {method} is not available here (known: {', '.join(known)})")
    if method not in INTEGER:
        return known[method]()
    options = dict(bits=args.bits, group_size=args.group_size, keep=tuple(args.keep or ()))
    if method in CALIBRATED:
        options.update(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    return known[method](**options)


def run_one(args) -> None:
    """Child process: quantize once, print the measurements as JSON."""
    from fanformer.quant.checkpoint import quantize_checkpoint

    torch.set_num_threads(args.threads) if args.threads else None
    start = time.perf_counter()
    report = quantize_checkpoint(args.path, method_config(args.one, args), args.out, force=True,
                                 cache_dir=args.cache_dir, progress=False)
    print(json.dumps({"seconds": report["seconds"], "wall_seconds": time.perf_counter() - start,
                      "peak_rss_bytes": peak_rss_bytes(),
                      "file_bytes": (Path(args.out) / WEIGHTS_FILE).stat().st_size}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a trained checkpoint (instead of --preset)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--bits", type=int, default=4, help="rtn/gptq/awq bits (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="rtn/gptq/awq group size (default 128)")
    parser.add_argument("--calib-samples", type=int, default=128, help="gptq/awq windows (default 128, as the CLI)")
    parser.add_argument("--calib-seq-len", type=int, help="gptq/awq tokens per window (default min(512, max_seq_len))")
    parser.add_argument("--keep", action="append", metavar="PATTERN",
                        help="rtn/gptq/awq: leave matching layers in float (repeatable), as fanformer quantize --keep")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--work", help="folder for the checkpoint and outputs (default: a temporary one)")
    parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: this method only
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.one:
        return run_one(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="fanformer-quantize-"))
    checkpoint = Path(args.path) if args.path else random_checkpoint(args.preset, work / "checkpoint")
    max_seq_len = load_config(checkpoint).max_seq_len
    seq_len = args.calib_seq_len or min(512, max_seq_len)

    from fanformer.tokenizer import load_tokenizer
    from fanformer.quant.calibration import calibration_tokens

    calibration_tokens(load_tokenizer(checkpoint), None, args.calib_samples, seq_len, cache_dir=args.cache_dir)
    float_bytes = (checkpoint / WEIGHTS_FILE).stat().st_size
    rows = {}
    for method in args.methods:
        command = [sys.executable, __file__, str(checkpoint), "--one", method, "--out", str(work / method),
                   "--bits", str(args.bits), "--group-size", str(args.group_size),
                   "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(seq_len)]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += [flag for pattern in args.keep or () for flag in ("--keep", pattern)]
        command += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            rows[method] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method}: {rows[method]}", file=sys.stderr)
    source = args.path or f"preset {args.preset} (random init)"
    if args.json:
        print(json.dumps({"source": source, "device": device_name("cpu"), "threads": torch.get_num_threads(),
                          "float_bytes": float_bytes, "calib_samples": args.calib_samples, "calib_seq_len": seq_len,
                          "rows": rows}, indent=2))
        return
    print(f"{device_name('cpu')} | torch {torch.__version__} | {torch.get_num_threads()} threads | {source} | "
          f"w{args.bits} g{args.group_size} | calibration {args.calib_samples} x {seq_len} tokens\n")
    print("| method | quantize s | wall s | peak RSS | model.safetensors | vs float |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| float (fp32) | | | | {float_bytes / 2**20:,.1f} MiB | 1.00x |")
    for method, row in rows.items():
        if "error" in row:
            print(f"| {method} | failed: {row['error']} | | | | |")
            continue
        print(f"| {method} | {row['seconds']:,.1f} | {row['wall_seconds']:,.1f} | "
              f"{row['peak_rss_bytes'] / 2**20:,.0f} MiB | {row['file_bytes'] / 2**20:,.1f} MiB | "
              f"{float_bytes / row['file_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
