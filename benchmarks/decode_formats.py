"""Decode speed of every runtime on one model: PyTorch, onnxruntime fp32 / int8 / int4,
onnxruntime-genai, the GGUF backend (f16, bf16, q8_0, q4_0) and llama.cpp, same prompt
tokens, one table.

For a preset the model is randomly initialised (speed does not depend on the weights)
and saved with a small byte-level tokenizer; a PATH is a trained checkpoint. Each ONNX
and GGUF variant is exported with `fanformer export`'s own code, then every variant is timed by
benchmarks/decode.py in a process of its own, so the peak resident memory column is that
variant's alone.

llama.cpp has no FANformer architecture, so it runs the `*-llama` variants: the same
model as a plain Llama (p = 0, pre-norm, no CoLA, no gated residuals; for a PATH, the
checkpoint itself if it is one), exported with `--arch llama`. PyTorch and the GGUF
backend run that model too (`pytorch-llama`, `gguf-llama-*`), so llama.cpp is compared on
the same file. Without llama-cpp-python (`pip install llama-cpp-python`) its rows are
skipped with a message.

    python benchmarks/decode_formats.py --preset small
    python benchmarks/decode_formats.py --preset seed-92m --decode-steps 16
    python benchmarks/decode_formats.py runs/quickstart --variants pytorch onnx genai
    python benchmarks/decode_formats.py --preset small --variants pytorch gguf-f16 gguf-q8_0 gguf-q4_0
    python benchmarks/decode_formats.py --preset small --variants pytorch-llama gguf-llama-q4_0 llama.cpp-q4_0

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
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


class Variant(NamedTuple):
    format: str | None  # export format; None times the checkpoint itself
    options: dict  # export options
    flags: list[str]  # extra decode.py flags
    llama: bool = False  # run the model as a plain Llama (AS_LLAMA)


VARIANTS = {
    "pytorch": Variant(None, {}, []),
    "onnx": Variant("onnx", {"dtype": "fp32"}, []),
    "onnx-int8": Variant("onnx", {"dtype": "fp32", "quantize": "int8"}, []),
    "onnx-int4": Variant("onnx", {"dtype": "fp32", "quantize": "int4"}, []),
    "genai": Variant("onnx", {"dtype": "fp32"}, ["--genai"]),
    **{f"gguf-{t}": Variant("gguf", {"type": t}, []) for t in ("f16", "bf16", "q8_0", "q4_0")},
    "pytorch-llama": Variant(None, {}, [], llama=True),
    **{f"gguf-llama-{t}": Variant("gguf", {"type": t, "arch": "llama"}, [], llama=True)
       for t in ("f16", "q8_0", "q4_0")},
    **{f"llama.cpp-{t}": Variant("gguf", {"type": t, "arch": "llama"}, ["--llama-cpp"], llama=True)
       for t in ("f16", "q8_0", "q4_0")},
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


def export_path(work: Path, format: str, options: dict) -> Path:
    """Where a variant's export goes: a folder for ONNX, a .gguf file for GGUF."""
    if format == "gguf":
        return work / f"model-{options.get('arch', 'fanformer')}-{options['type']}.gguf"
    return work / f"onnx-{options.get('quantize') or options['dtype']}"


def time_variant(path: Path, flags: list[str], args) -> dict:
    command = [sys.executable, str(HERE / "decode.py"), str(path), "--json", "--device", "cpu",
               "--decode-steps", str(args.decode_steps), "--repeats", str(args.repeats), *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # reported after the table: one runtime crashing should not hide the others
        return {"error": f"{' '.join(command)} failed (exit code {done.returncode}):\n{done.stderr[-2000:]}"}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a trained checkpoint (instead of --preset)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
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

    results, failed = [], []
    for variant in args.variants:
        format, options, flags, llama = VARIANTS[variant]
        if "--llama-cpp" in flags and importlib.util.find_spec("llama_cpp") is None:
            print(f"skipping {variant}: llama-cpp-python is not installed (pip install llama-cpp-python)",
                  file=sys.stderr)
            continue
        checkpoint = checkpoint_for(llama)
        if checkpoint is None:
            print(f"skipping {variant}: {args.path} is not a plain Llama ({AS_LLAMA})", file=sys.stderr)
            continue
        path = checkpoint
        if format is not None:
            path = export_path(work, format, options)
            if not path.exists():
                export(checkpoint, format, path, validate=VALIDATORS.get(format), **options)
        timing = time_variant(path, flags, args)
        if "error" in timing:
            failed.append(f"{variant}: {timing['error']}")
            continue
        decode = [r for r in timing["rows"] if r["phase"].startswith("decode")]
        results.append({"variant": variant, "file_bytes": folder_bytes(path),
                        "prefill_tokens_per_s": timing["rows"][0]["tokens_per_s"],
                        "decode_short": decode[0]["tokens_per_s"], "decode_long": decode[-1]["tokens_per_s"],
                        "contexts": timing["contexts"], "peak_rss_bytes": timing["peak_memory_bytes"]})
    if args.json:
        print(json.dumps({"source": args.path or f"preset {args.preset}", "device": device_name("cpu"),
                          "torch": torch.__version__, "results": results, "failed": failed}, indent=2))
    elif results:
        print_table(results, args)
    if failed:
        raise SystemExit("\n".join(failed))


def print_table(results: list[dict], args) -> None:
    short, long = results[0]["contexts"][0], results[0]["contexts"][-1]
    print(f"{device_name('cpu')} | torch {torch.__version__} | {args.path or f'preset {args.preset} (random init)'} | "
          f"batch 1 | best of {args.repeats}")
    header = (f"{'variant':<15} | {'file MiB':>8} | {'prefill tok/s':>13} | {f'decode @{short}':>11} | "
              f"{f'decode @{long}':>12} | {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['variant']:<15} | {r['file_bytes'] / 2**20:>8.1f} | {r['prefill_tokens_per_s']:>13,.0f} | "
              f"{r['decode_short']:>11,.1f} | {r['decode_long']:>12,.1f} | {r['peak_rss_bytes'] / 2**20:>12,.0f}")


if __name__ == "__main__":
    main()
