"""Decode speed of every runtime on one model: PyTorch, onnxruntime fp32 / int8 / int4,
onnxruntime-genai and the GGUF backend (f16, q8_0, q4_0), same prompt tokens, one table.

For a preset the model is randomly initialised (speed does not depend on the weights)
and saved with a small byte-level tokenizer; a PATH is a trained checkpoint. Each ONNX
and GGUF variant is exported with `fanformer export`'s own code, then every variant is timed by
benchmarks/decode.py in a process of its own, so the peak resident memory column is that
variant's alone.

    python benchmarks/decode_formats.py --preset small
    python benchmarks/decode_formats.py --preset seed-92m --decode-steps 16
    python benchmarks/decode_formats.py runs/quickstart --variants pytorch onnx genai
    python benchmarks/decode_formats.py --preset small --variants pytorch gguf-f16 gguf-q8_0 gguf-q4_0

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.checkpoint import save_checkpoint
from fanformer.config import PRESETS, FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

HERE = Path(__file__).parent
# variant -> (export format, export options; or None, None for the checkpoint itself; extra decode.py flags)
VARIANTS = {
    "pytorch": (None, None, []),
    "onnx": ("onnx", {"dtype": "fp32"}, []),
    "onnx-int8": ("onnx", {"dtype": "fp32", "quantize": "int8"}, []),
    "onnx-int4": ("onnx", {"dtype": "fp32", "quantize": "int4"}, []),
    "genai": ("onnx", {"dtype": "fp32"}, ["--genai"]),
    "gguf-f16": ("gguf", {"type": "f16"}, []),
    "gguf-q8_0": ("gguf", {"type": "q8_0"}, []),
    "gguf-q4_0": ("gguf", {"type": "q4_0"}, []),
}


def random_checkpoint(preset: str, out: Path) -> Path:
    """A random-init model of the preset with a minimal byte-level BPE tokenizer."""
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name(preset))
    tokenizer = train_tokenizer([Path(__file__).read_text()], MIN_VOCAB_SIZE)
    return save_checkpoint(out, model, tokenizer)


def folder_bytes(path: Path) -> int:
    """The model's weights on disk: model.safetensors, model.onnx (+ its external data), or the GGUF file."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model."))


def export_path(work: Path, format: str, options: dict) -> Path:
    """Where a variant's export goes: a folder for ONNX, a .gguf file for GGUF."""
    if format == "gguf":
        return work / f"model-{options['type']}.gguf"
    return work / f"onnx-{options.get('quantize') or options['dtype']}"


def time_variant(path: Path, flags: list[str], args) -> dict:
    command = [sys.executable, str(HERE / "decode.py"), str(path), "--json", "--device", "cpu",
               "--decode-steps", str(args.decode_steps), "--repeats", str(args.repeats), *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
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

    from export import export

    work = Path(args.work or tempfile.mkdtemp(prefix="fanformer-decode-"))
    checkpoint = Path(args.path) if args.path else random_checkpoint(args.preset, work / "checkpoint")
    results = []
    for variant in args.variants:
        format, options, flags = VARIANTS[variant]
        path = checkpoint
        if format is not None:
            path = export_path(work, format, options)
            if not path.exists():
                export(checkpoint, format, path, **options)
        timing = time_variant(path, flags, args)
        decode = [r for r in timing["rows"] if r["phase"].startswith("decode")]
        results.append({"variant": variant, "file_bytes": folder_bytes(path),
                        "prefill_tokens_per_s": timing["rows"][0]["tokens_per_s"],
                        "decode_short": decode[0]["tokens_per_s"], "decode_long": decode[-1]["tokens_per_s"],
                        "contexts": timing["contexts"], "peak_rss_bytes": timing["peak_memory_bytes"]})
    if args.json:
        print(json.dumps({"source": args.path or f"preset {args.preset}", "device": device_name("cpu"),
                          "torch": torch.__version__, "results": results}, indent=2))
        return
    short, long = results[0]["contexts"][0], results[0]["contexts"][-1]
    print(f"{device_name('cpu')} | torch {torch.__version__} | {args.path or f'preset {args.preset} (random init)'} | "
          f"batch 1 | best of {args.repeats}")
    header = (f"{'variant':<11} | {'file MiB':>8} | {'prefill tok/s':>13} | {f'decode @{short}':>11} | "
              f"{f'decode @{long}':>12} | {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['variant']:<11} | {r['file_bytes'] / 2**20:>8.1f} | {r['prefill_tokens_per_s']:>13,.0f} | "
              f"{r['decode_short']:>11,.1f} | {r['decode_long']:>12,.1f} | {r['peak_rss_bytes'] / 2**20:>12,.0f}")


if __name__ == "__main__":
    main()
