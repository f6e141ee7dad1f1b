"""Forward time of the causal FFTNet mixer against attention as the sequence grows.

Times one token-mixing layer of each kind as fanformer.model builds it, at the same
width (d_model 256, 4 heads of 64 over 2 KV heads by default), batch 1, forward only
under torch.inference_mode: `Attention` (ATF: FAN layer, Q/K/V, RoPE, causal
SDPA, output projection) and `FFTNetMixer` (FAN layer, value projection, the causal
adaptive spectral filter with R + 1 = 3 zero-padded FFT convolutions, modReLU, output
projection). Each time is the median of --repeats runs after a warm-up.

The table gives each layer's growth exponent between consecutive lengths, log(t2/t1) /
log(T2/T1): about 1.1 for T log T at these lengths, 2 for T^2 once the quadratic term
dominates (below that, the T-linear projections pull it down). Then two two-parameter
least-squares fits of the times, a + b T log2 T and a + c T^2, and their relative RMS
residuals: the smaller residual names the growth law the times follow.

    python benchmarks/fftnet_scaling.py                         # 512, 2048, 8192 on the CPU
    python benchmarks/fftnet_scaling.py --device cuda --lengths 512 2048 8192 32768

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.config import FANformerConfig
from fanformer.model import Attention, FFTNetMixer, rope_cos_sin


def time_forward(layer: torch.nn.Module, x: torch.Tensor, cos, sin, repeats: int) -> float:
    """Median seconds of one forward (after one warm-up run)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        layer(x, cos, sin, None)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x, cos, sin, None)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_residual(lengths: np.ndarray, times: np.ndarray, features) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of times ~ features(T) and the relative RMS residual."""
    X = np.stack([f(lengths) for f in features], axis=1)
    coef, *_ = np.linalg.lstsq(X, times, rcond=None)
    return coef, float(np.sqrt(np.mean(((X @ coef - times) / times) ** 2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    head_dim = args.d_model // args.heads
    rows = []
    for T in args.lengths:
        # n_kv_heads = n_heads / 2: FFTNet's value width 2 nkv hs is then d_model, as attention's.
        config = FANformerConfig(vocab_size=512, d_model=args.d_model, n_heads=args.heads,
                                 n_kv_heads=args.heads // 2, head_dim=head_dim, ffn_dim=4 * args.d_model,
                                 max_seq_len=T)
        torch.manual_seed(0)
        attention = Attention(config, 0).to(device, dtype).eval()
        fftnet = FFTNetMixer(config.replace(mixer="fftnet"), 0)
        fftnet.filter.reset_parameters()
        fftnet = fftnet.to(device, dtype).eval()
        x = torch.randn(1, T, args.d_model, device=device, dtype=dtype)
        cos, sin = rope_cos_sin(torch.arange(T, device=device)[None], head_dim, config.rope_theta)
        rows.append((T, time_forward(attention, x, cos, sin, args.repeats),
                     time_forward(fftnet, x, cos, sin, args.repeats)))

    where = device_name(device) + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    print(f"forward time of one mixing layer, d_model {args.d_model}, batch 1, {args.dtype}, {where}")
    print(f"{'T':>7}{'attention ms':>15}{'fftnet ms':>12}{'attn / fftnet':>15}{'attn growth':>13}{'fftnet growth':>15}")
    for i, (T, ta, tf) in enumerate(rows):
        growth = ("", "")
        if i:
            T0, ta0, tf0 = rows[i - 1]
            growth = tuple(f"T^{math.log(t / t0) / math.log(T / T0):.2f}" for t, t0 in ((ta, ta0), (tf, tf0)))
        print(f"{T:>7}{1e3 * ta:>15.2f}{1e3 * tf:>12.2f}{ta / tf:>15.2f}{growth[0]:>13}{growth[1]:>15}")

    lengths = np.array([r[0] for r in rows], dtype=np.float64)
    laws = {"a + b T log T": [np.ones_like, lambda T: T * np.log2(T)], "a + c T^2": [np.ones_like, np.square]}
    if len(rows) >= 3:
        print("two-parameter least-squares fits: relative RMS residual (smaller = the law the times follow)")
        for column, name in ((1, "attention"), (2, "fftnet")):
            times = np.array([r[column] for r in rows])
            fits = "   ".join(f"{law}: {100 * fit_residual(lengths, times, f)[1]:5.1f}%" for law, f in laws.items())
            print(f"  {name:<10} {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
