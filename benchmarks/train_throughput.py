"""Training throughput and MFU of FANformer against the same-shape Transformer (p = 0).

Both models are built from one preset, differing only in `p`, and timed in the same
process on synthetic random token batches (no dataset). Each step is the step of
`fanformer train` (fanformer/training.py): AdamW over `param_groups` (fused on CUDA),
`lm_loss` under `autocast` (bf16 on CUDA, fp32 on CPU), backward, gradient clipping,
optimizer step. Like the training loop, it reads the loss back only at log steps, so the
GPU is never waited on inside the timed steps (the final synchronize is timed).

FLOPs per token (forward + backward), the PaLM-appendix / nanoGPT estimate:

    6 * N  +  12 * n_layers * n_heads * head_dim * seq_len / 2

N is the weight count of every nn.Linear (the LM head included, the embedding lookup
not), so CoLA layers count their low-rank factors A and B as they are. The second term
is attention's QK^T and AV matmuls, halved because the mask is causal. The FAN layer's
cos/sin, norms, RoPE and softmax are elementwise and counted as negligible.
MFU = achieved FLOP/s / the GPU's dense bf16 peak (a small table below, or
--peak-tflops); on the CPU it is n/a unless --peak-tflops is given.

    python benchmarks/train_throughput.py                          # seed-92m, 16 x 1024 on CUDA
    python benchmarks/train_throughput.py --preset tiny --steps 5  # CPU smoke run
    python benchmarks/train_throughput.py --preset paper-300m --compile --json

Warmup steps (and compilation) are not timed; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters
from fanformer.training import Dist, TrainConfig, batch_starts, optimizer_step, param_groups

# Dense bf16 tensor-core peaks (no sparsity), matched by substring of the device name in
# order, so the more specific names come first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12), ("L40S", 362e12),
    ("RTX 4090", 165e12),  # with fp32 accumulate, as PyTorch uses; 330 with fp16 accumulate
    ("RTX 3090", 71e12), ("L4", 121e12),
]
# The seed card's figure: 5.9 it/s at batch 16 x 1024 on one RTX 4090 (../shared/ARCHITECTURE.md).
SEED_CARD_ANCHOR = "seed card anchor (RTX 4090, 16 x 1024): 5.9 it/s, ~97k tokens/s"


def matmul_params(model: nn.Module) -> int:
    """N of the 6N rule: weights of all linears (LM head and CoLA factors), not the embedding."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() for w in weights.values())


def flops_per_token(model: FANformer, seq_len: int) -> float:
    c = model.config
    return 6 * matmul_params(model) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len / 2




def peak_flops(name: str, device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(config: FANformerConfig, args, device: torch.device) -> dict:
    """Time `args.steps` training steps after `args.warmup` untimed ones."""
    torch.manual_seed(0)
    model = FANformer(config).to(device).train()
    # The defaults of `fanformer train` (lr, betas, weight decay, clipping) and its own step.
    train = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=(train.beta1, train.beta2), fused=device.type == "cuda")
    net = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=64 * args.seq_len, dtype=np.int64)
    steps_done = 0

    def step() -> None:
        nonlocal steps_done
        starts = batch_starts(len(tokens), args.seq_len, args.batch_size, seed=0, step=steps_done)
        optimizer_step(net, model, optimizer, tokens, starts, args.seq_len, train, Dist(), device)
        steps_done += 1

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0

    tokens_per_s = args.steps * args.batch_size * args.seq_len / seconds
    result = {"p": config.p, "params": count_parameters(model), "matmul_params": matmul_params(model),
              "flops_per_token": flops_per_token(model, args.seq_len), "seconds": seconds,
              "it_per_s": args.steps / seconds, "tokens_per_s": tokens_per_s}
    result["tflops_per_s"] = result["flops_per_token"] * tokens_per_s / 1e12
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del net, model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.compile:
        torch._dynamo.reset()
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), help="default: seed-92m on CUDA, tiny on CPU")
    parser.add_argument("--batch-size", type=int, help="default: 16 on CUDA, 8 on CPU")
    parser.add_argument("--seq-len", type=int,
                        help="default: 1024 on CUDA (capped at the preset's max_seq_len), max_seq_len on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--p", type=float, help="FANformer's periodicity ratio (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s for MFU (overrides the table)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = args.device.type == "cuda"
    args.preset = args.preset or ("seed-92m" if on_cuda else "tiny")
    max_seq_len = PRESETS[args.preset]["max_seq_len"]
    args.batch_size = args.batch_size or (16 if on_cuda else 8)
    args.seq_len = args.seq_len or (min(1024, max_seq_len) if on_cuda else max_seq_len)
    if args.seq_len > max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds {args.preset}'s max_seq_len {max_seq_len}")
    if min(args.batch_size, args.seq_len, args.steps) <= 0 or args.warmup < 0:
        parser.error("--batch-size, --seq-len and --steps must be positive, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    device = args.device
    fan = FANformerConfig.from_name(args.preset, **({} if args.p is None else {"p": args.p}))
    configs = {f"FANformer (p={fan.p:g})": fan, "Transformer (p=0)": fan.replace(p=0.0)}
    results = {label: benchmark(config, args, device) for label, config in configs.items()}
    name = device_name(device)
    peak = peak_flops(name, device, args.peak_tflops)
    for r in results.values():
        r["mfu"] = r["tflops_per_s"] * 1e12 / peak if peak else None
    fan_r, base_r = results.values()
    ratio = fan_r["tokens_per_s"] / base_r["tokens_per_s"]

    if args.json:
        print(json.dumps({"preset": args.preset, "device": name, "torch": torch.__version__,
                          "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                          "warmup": args.warmup, "compile": args.compile, "peak_flops": peak,
                          "results": results, "fanformer_over_transformer": ratio}, indent=2))
        return
    print(f"{name} | torch {torch.__version__} | preset {args.preset} | batch {args.batch_size} x "
          f"{args.seq_len} | {args.steps} steps after {args.warmup} warmup"
          f"{' | compiled' if args.compile else ''}")
    if peak:
        print(f"peak: {peak / 1e12:g} TFLOP/s ({'--peak-tflops' if args.peak_tflops else 'dense bf16'})")
    else:
        where = "GPU not in the table" if device.type == "cuda" else "CPU"
        print(f"peak: unknown ({where}), so MFU is n/a; pass --peak-tflops to set it")
    header = f"{'model':<22} | {'params':>8} | {'tokens/s':>10} | {'it/s':>7} | {'TFLOP/s':>8} | {'MFU':>6}"
    has_mem = device.type == "cuda"
    print(header + (f" | {'peak mem':>9}" if has_mem else ""))
    print("-" * (len(header) + (12 if has_mem else 0)))
    for label, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        row = (f"{label:<22} | {r['params'] / 1e6:>7.2f}M | {r['tokens_per_s']:>10,.0f} | "
               f"{r['it_per_s']:>7.2f} | {r['tflops_per_s']:>8.3f} | {mfu:>6}")
        print(row + (f" | {r['peak_mem_gib']:>6.2f} GiB" if has_mem else ""))
    print(f"FANformer / Transformer throughput: {ratio:.3f}x "
          f"(FLOPs/token {fan_r['flops_per_token'] / base_r['flops_per_token']:.3f}x)")
    if args.preset == "seed-92m":
        print(SEED_CARD_ANCHOR)


if __name__ == "__main__":
    try:
        main()
    except FANformerError as err:  # a bad --p and the like: one line, as the CLI does
        sys.exit(f"error: {err}")
