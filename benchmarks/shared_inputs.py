"""What packing the layers that read one input gains in the fused ONNX graph: a CoLA
model's Q/K/V and gate/up A factors as one MatMul (one SiLU per group, then a split)
against one MatMul each, on the same weights (export/onnx_fused.py, `FusedBuilder.pack`).

Both graphs are loaded in one process and timed in alternating rounds (the machines are
shared and noisy): prefill tokens/s of a `--prompt`-token prompt and greedy batch-1
decode tokens/s after a 64-token one (runtime/decode_timing.py), the best of `--repeats`
runs per round, the median over `--rounds`. The model is a random-init preset (speed
does not depend on the weights); seed-92m is CoLA at rank in/4 on every linear.

    python benchmarks/shared_inputs.py --preset seed-92m --rounds 5
    python benchmarks/shared_inputs.py --preset seed-92m --quantize ''   # fp32

The same packing in the GGUF backend's ggml engine was measured with a script like this
one (2026-12-05, seed-92m q4_0, 1 thread, 5 alternating rounds): decode 482.6 tok/s packed,
480.8 one by one, and prefill 0.97x; no gain, so the engine runs the factors one by one.

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from decode import best_seconds, random_prompt, time_prefill  # benchmarks/: a script's own folder is on sys.path
from decode_formats import random_checkpoint
from fanformer.config import PRESETS
from fanformer.export import export
from fanformer.export.onnx_fused import FusedBuilder
from fanformer.runtime import load_backend
from fanformer.runtime.decode_timing import decode_tokens_per_s


def load_variants(checkpoint: Path, work: Path, args) -> dict:
    """name -> backend: the fused ONNX graph, packed and not."""
    options = {"quantize": args.quantize} if args.quantize else {}
    label = f"onnx-{args.quantize or 'fp32'}"
    variants = {}
    for pack in (True, False):
        FusedBuilder.pack = pack
        try:
            folder = export(checkpoint, "onnx", work / f"onnx-{pack}", **options)
        finally:
            FusedBuilder.pack = True
        variants[f"{label}{'' if pack else '-unpacked'}"] = load_backend(folder, threads=args.threads)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="seed-92m")
    parser.add_argument("--quantize", default="int4", help="the ONNX export's --quantize ('' for fp32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length (default 256)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant per round (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = load_variants(random_checkpoint(args.preset, work / "ckpt"), work, args)
        prefill = {name: [] for name in variants}
        decode = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, backend in variants.items():  # alternating: each round times every variant
                prompt = random_prompt(backend, 1, args.prompt)
                prefill[name].append(args.prompt / best_seconds(lambda: time_prefill(backend, prompt), args.repeats))
                decode[name].append(decode_tokens_per_s(backend, args.decode_steps, args.repeats))
    print(f"{args.preset}, {args.threads} thread(s), median of {args.rounds} alternating rounds "
          f"(best of {args.repeats} runs each)\n")
    print(f"| variant | prefill tok/s ({args.prompt}) | decode tok/s | packed / unpacked (prefill, decode) |")
    print("|---|---|---|---|")
    for name in variants:
        p, d = statistics.median(prefill[name]), statistics.median(decode[name])
        ratio = ""
        if not name.endswith("-unpacked"):
            other = f"{name}-unpacked"
            ratio = (f"{p / statistics.median(prefill[other]):.2f}x, "
                     f"{d / statistics.median(decode[other]):.2f}x")
        print(f"| {name} | {p:,.0f} | {d:,.1f} | {ratio} |")


if __name__ == "__main__":
    main()
