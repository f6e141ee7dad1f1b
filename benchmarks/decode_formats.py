"""Decode speed of every runtime on one model: PyTorch, onnxruntime fp32 / int8 / int4
(the fused graph, and the plain one of --no-optimize), onnxruntime-genai on our folders and
on its own model builder's, the GGUF backend's two engines (f16, bf16, q8_0, q4_0) and
llama.cpp, same prompt tokens, one table.

For a preset the model is randomly initialised (speed does not depend on the weights)
and saved with a small byte-level tokenizer; a PATH is a trained checkpoint. Each ONNX
and GGUF variant is exported with `fanformer export`'s own code, then every variant is timed by
benchmarks/decode.py in a process of its own, so the peak resident memory column is that
variant's alone. `ggml-*` rows run the GGUF backend's ggml engine, `gguf-torch-*` rows its
torch engine, on the same files.

llama.cpp has no FANformer architecture, so it runs the `*-llama` variants: the same
model as a plain Llama (p = 0, pre-norm, no CoLA, no gated residuals; for a PATH, the
checkpoint itself if it is one), exported with `--arch llama`. PyTorch and the GGUF
backend run that model too (`pytorch-llama`, `ggml-llama-*`, `gguf-torch-llama-*`), so
llama.cpp is compared on the same file. Without llama-cpp-python (`pip install
llama-cpp-python`) its rows are skipped with a message, as the ggml rows are without
ggml-python. onnxruntime-genai's model builder knows Llama, not FANformer, so it too is
given the `*-llama` model (as a Hugging Face Llama folder, benchmarks/genai_builder.py):
`genai-builder-llama*` against our export of the same weights, `genai-llama*`.

On a shared machine: `--rounds N` times every variant N times, the variants alternating
(so a change in load hits them alike), and the table gives medians; `--threads 1 2` times
each at both thread counts; the 1-minute load average is printed as the run goes. With
`--bandwidth` the machine's memory read bandwidth is measured and each GGUF row's decode
is given as a fraction of its bound: read bandwidth / weight bytes a token.

    python benchmarks/decode_formats.py --preset small
    python benchmarks/decode_formats.py --preset seed-92m --decode-steps 16
    python benchmarks/decode_formats.py runs/quickstart --variants pytorch onnx genai
    python benchmarks/decode_formats.py --preset small --variants pytorch ggml-f16 ggml-q8_0 ggml-q4_0
    python benchmarks/decode_formats.py --preset seed-92m --variants ggml-llama-q4_0 llama.cpp-q4_0 ggml-q4_0 \\
        --threads 1 2 --rounds 3 --bandwidth

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.checkpoint import load_model, save_checkpoint
from fanformer.config import PRESETS, FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

HERE = Path(__file__).parent
# The options that make a FANformer a plain Llama (export/gguf_export.py's llama_blockers).
AS_LLAMA = dict(p=0.0, norm="pre", cola_rank=0.0, cola_lm_head=False, gated_residual=False)
GGUF_TYPES, LLAMA_TYPES = ("f16", "bf16", "q8_0", "q4_0"), ("f16", "q8_0", "q4_0")
GGML_FLAGS, TORCH_ENGINE_FLAGS = ["--engine", "ggml"], ["--engine", "torch"]


class Variant(NamedTuple):
    format: str | None  # export format; None times the checkpoint itself
    options: dict  # export options
    flags: list[str]  # extra decode.py flags
    llama: bool = False  # run the model as a plain Llama (AS_LLAMA)


PLAIN = {"optimize": False}  # the ONNX export of standard ops (before the fused graph)
INT4, INT4_PLAIN = {"quantize": "int4"}, {"quantize": "int4", "optimize": False, "accuracy_level": 0}
VARIANTS = {
    "pytorch": Variant(None, {}, []),
    "onnx": Variant("onnx", {"dtype": "fp32"}, []),
    "onnx-plain": Variant("onnx", {"dtype": "fp32", **PLAIN}, []),
    "onnx-int8": Variant("onnx", {"dtype": "fp32", "quantize": "int8"}, []),
    "onnx-int4": Variant("onnx", {"dtype": "fp32", **INT4}, []),
    "onnx-int4-acc0": Variant("onnx", {"dtype": "fp32", **INT4, "accuracy_level": 0}, []),
    "onnx-int4-plain": Variant("onnx", {"dtype": "fp32", **INT4_PLAIN}, []),
    "genai": Variant("onnx", {"dtype": "fp32"}, ["--genai"]),
    "genai-int4": Variant("onnx", {"dtype": "fp32", **INT4}, ["--genai"]),
    "genai-int4-plain": Variant("onnx", {"dtype": "fp32", **INT4_PLAIN}, ["--genai"]),
    # onnxruntime-genai's own model builder on the same weights as a Hugging Face Llama
    # (benchmarks/genai_builder.py), against our export of that model, both run by genai.
    "onnx-llama": Variant("onnx", {"dtype": "fp32"}, [], llama=True),
    "onnx-llama-int4": Variant("onnx", {"dtype": "fp32", **INT4}, [], llama=True),
    "genai-llama-int4": Variant("onnx", {"dtype": "fp32", **INT4}, ["--genai"], llama=True),
    "genai-builder-llama-int4": Variant("genai-builder", {"precision": "int4", "accuracy_level": 4}, ["--genai"],
                                        llama=True),
    "genai-llama": Variant("onnx", {"dtype": "fp32"}, ["--genai"], llama=True),
    "genai-builder-llama": Variant("genai-builder", {"precision": "fp32"}, ["--genai"], llama=True),
    **{f"ggml-{t}": Variant("gguf", {"type": t}, GGML_FLAGS) for t in GGUF_TYPES},
    **{f"gguf-torch-{t}": Variant("gguf", {"type": t}, TORCH_ENGINE_FLAGS) for t in GGUF_TYPES},
    "pytorch-llama": Variant(None, {}, [], llama=True),
    **{f"ggml-llama-{t}": Variant("gguf", {"type": t, "arch": "llama"}, GGML_FLAGS, llama=True) for t in LLAMA_TYPES},
    **{f"gguf-torch-llama-{t}": Variant("gguf", {"type": t, "arch": "llama"}, TORCH_ENGINE_FLAGS, llama=True)
       for t in LLAMA_TYPES},
    **{f"llama.cpp-{t}": Variant("gguf", {"type": t, "arch": "llama"}, ["--llama-cpp"], llama=True)
       for t in LLAMA_TYPES},
}


def random_checkpoint(preset: str, out: Path, llama: bool = False) -> Path:
    """A random-init model of the preset (as a plain Llama if `llama`) with a minimal byte-level BPE tokenizer."""
    torch.manual_seed(0)
    config = FANformerConfig.from_name(preset, **(AS_LLAMA if llama else {}))
    model = FANformer(config)
    tokenizer = train_tokenizer([Path(__file__).read_text()], MIN_VOCAB_SIZE)
    return save_checkpoint(out, model, tokenizer)


def is_llama(checkpoint: Path) -> bool:
    config = load_model(checkpoint).config
    return all(getattr(config, key) == value for key, value in AS_LLAMA.items())


def folder_bytes(path: Path) -> int:
    """The model's weights on disk: model.safetensors, model.onnx (+ its external data), or the GGUF file."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model."))


def export_path(work: Path, format: str, options: dict, llama: bool) -> Path:
    """Where a variant's export goes: a folder for ONNX, a .gguf file for GGUF."""
    if format == "gguf":
        return work / f"model-{options.get('arch', 'fanformer')}-{options['type']}.gguf"
    return work / "-".join([format, "llama" if llama else "fanformer", *(f"{k}{v}" for k, v in options.items())])


def gguf_costs(path: Path) -> dict:
    """What one decode step of a GGUF file must read and compute, from its tensors: weight
    bytes (every matrix once, one embedding row; the embedding whole when it is also the
    LM head) and matmul FLOPs per token (2 in out per matrix; attention left out)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors and "output_a.weight" not in tensors
    read, flops = 0, 0
    for name, t in tensors.items():
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        if name == "token_embd.weight" and not tied:
            read += int(t.n_bytes) // rows
            continue
        read += int(t.n_bytes)
        if len(t.shape) > 1:
            flops += 2 * int(t.shape[0]) * rows
    return {"bytes_per_token": read, "flops_per_token": flops}


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory with `threads` threads: numpy summing a
    buffer far larger than the caches (the best of `repeats`; numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    chunks = np.array_split(np.ones(mib * 2**20 // 8, dtype=np.float64), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = min(best, time.perf_counter() - start)
    return mib * 2**20 / best


def time_variant(path: Path, flags: list[str], args, threads: int) -> dict:
    command = [sys.executable, str(HERE / "decode.py"), str(path), "--json", "--device", "cpu",
               "--decode-steps", str(args.decode_steps), "--repeats", str(args.repeats), "--threads", str(threads),
               *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # reported after the table: one runtime crashing should not hide the others
        return {"error": f"{' '.join(command)} failed (exit code {done.returncode}):\n{done.stderr[-2000:]}"}
    return json.loads(done.stdout)


def skip_reason(variant: str, flags: list[str]) -> str | None:
    if "--llama-cpp" in flags and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if flags == GGML_FLAGS:
        from fanformer.runtime.gguf_backend import ggml_missing

        missing = ggml_missing()
        return None if missing is None else f"ggml-python does not load ({missing}): pip install ggml-python"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a trained checkpoint (instead of --preset)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement in a process (best kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="thread counts to time every variant at (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times every variant is timed, the variants alternating; the table gives medians")
    parser.add_argument("--bandwidth", action="store_true",
                        help="measure the memory read bandwidth and show each GGUF row against its bound")
    parser.add_argument("--work", help="folder for the checkpoint and exports (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fanformer.export import export
    from fanformer.runtime.validation import VALIDATORS

    work = Path(args.work or tempfile.mkdtemp(prefix="fanformer-decode-"))
    checkpoints = {}  # llama: checkpoint

    def checkpoint_for(llama: bool) -> Path | None:
        if llama not in checkpoints:
            if args.path:
                checkpoints[llama] = Path(args.path) if not llama or is_llama(Path(args.path)) else None
            else:
                checkpoints[llama] = random_checkpoint(args.preset, work / ("llama" if llama else "checkpoint"), llama)
        return checkpoints[llama]

    paths = {}  # variant -> what it times
    for variant in args.variants:
        format, options, flags, llama = VARIANTS[variant]
        reason = skip_reason(variant, flags)
        checkpoint = None if reason else checkpoint_for(llama)
        if reason is None and checkpoint is None:
            reason = f"{args.path} is not a plain Llama ({AS_LLAMA})"
        if reason:
            print(f"skipping {variant}: {reason}", file=sys.stderr)
            continue
        path = checkpoint
        if format is not None:
            path = export_path(work, format, options, llama)
            if path.exists():
                pass
            elif format == "genai-builder":
                from genai_builder import build  # benchmarks/genai_builder.py

                build(checkpoint, path, **options)
            else:
                export(checkpoint, format, path, validate=VALIDATORS.get(format), **options)
        paths[variant] = path

    load = [os.getloadavg()[0]]
    bandwidth = {t: read_bandwidth(t) for t in args.threads} if args.bandwidth else {}
    runs, failed = {}, []  # (variant, threads) -> [timing]
    for _ in range(args.rounds):  # the variants alternate, so a change in the machine's load hits them alike
        for threads in args.threads:
            for variant, path in paths.items():
                timing = time_variant(path, VARIANTS[variant].flags, args, threads)
                if "error" in timing:
                    failed.append(f"{variant} ({threads} threads): {timing['error']}")
                else:
                    runs.setdefault((variant, threads), []).append(timing)
        load.append(os.getloadavg()[0])
    results = [summary(variant, threads, timings, paths[variant], bandwidth.get(threads))
               for (variant, threads), timings in runs.items()]
    if args.json:
        print(json.dumps({"source": args.path or f"preset {args.preset}", "device": device_name("cpu"),
                          "torch": torch.__version__, "rounds": args.rounds, "load_average_1min": load,
                          "read_bandwidth_bytes_per_s": bandwidth, "results": results, "failed": failed}, indent=2))
    elif results:
        print_table(results, args, load, bandwidth)
    if failed:
        raise SystemExit("\n".join(failed))


def summary(variant: str, threads: int, timings: list[dict], path: Path, bandwidth: float | None) -> dict:
    """Medians over the rounds of one variant at one thread count."""
    def median_of(pick) -> float:
        return statistics.median(pick(t) for t in timings)

    decode = lambda t: [r for r in t["rows"] if r["phase"].startswith("decode")]  # noqa: E731
    result = {"variant": variant, "threads": threads, "file_bytes": folder_bytes(path), "rounds": len(timings),
              "prefill_tokens_per_s": median_of(lambda t: t["rows"][0]["tokens_per_s"]),
              "decode_short": median_of(lambda t: decode(t)[0]["tokens_per_s"]),
              "decode_long": median_of(lambda t: decode(t)[-1]["tokens_per_s"]),
              "contexts": timings[0]["contexts"], "peak_rss_bytes": max(t["peak_memory_bytes"] for t in timings),
              "runs": [{"prefill": t["rows"][0]["tokens_per_s"], "decode_short": decode(t)[0]["tokens_per_s"],
                        "decode_long": decode(t)[-1]["tokens_per_s"]} for t in timings]}
    if path.is_file():  # a GGUF file: what a decode step reads and computes
        result.update(gguf_costs(path))
        if bandwidth:
            result["bandwidth_bound_tokens_per_s"] = bandwidth / result["bytes_per_token"]
    return result


def print_table(results: list[dict], args, load: list[float], bandwidth: dict) -> None:
    short, long = results[0]["contexts"][0], results[0]["contexts"][-1]
    print(f"{device_name('cpu')} | torch {torch.__version__} | {args.path or f'preset {args.preset} (random init)'} | "
          f"batch 1 | medians of {args.rounds} alternating round(s), each the best of {args.repeats} | "
          f"1-min load average {' -> '.join(f'{x:.1f}' for x in load)}")
    for threads, bytes_per_s in bandwidth.items():
        print(f"memory read bandwidth, {threads} thread(s): {bytes_per_s / 1e9:.1f} GB/s")
    header = (f"{'variant':<22} | {'thr':>3} | {'file MiB':>8} | {'MiB/tok':>7} | {'prefill tok/s':>13} | "
              f"{f'decode @{short}':>11} | {f'decode @{long}':>12} | {'of bw bound':>11} | {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in sorted(results, key=lambda r: (r["threads"], list(VARIANTS).index(r["variant"]))):
        per_token = f"{r['bytes_per_token'] / 2**20:.1f}" if "bytes_per_token" in r else "-"
        bound = (f"{r['decode_short'] / r['bandwidth_bound_tokens_per_s']:.2f}x"
                 if "bandwidth_bound_tokens_per_s" in r else "-")
        print(f"{r['variant']:<22} | {r['threads']:>3} | {r['file_bytes'] / 2**20:>8.1f} | {per_token:>7} | "
              f"{r['prefill_tokens_per_s']:>13,.0f} | {r['decode_short']:>11,.1f} | {r['decode_long']:>12,.1f} | "
              f"{bound:>11} | {r['peak_rss_bytes'] / 2**20:>12,.0f}")


if __name__ == "__main__":
    main()
