"""Drift of the weight-only methods on one trained checkpoint, with AWQ's ablations.

Every row is quantized from the same float checkpoint with the same calibration windows
and scored by the runtime's evaluator (`runtime.drift`, the one `fanformer eval
--reference` uses) on the same held-out tokens against the FP16 reference. The AWQ rows
separate its two halves (scale search only, clipping search only) and show what leaving
the FAN projection in float does, for AWQ (the decision `quant/awq.py` documents) and,
to tell the layer's own sensitivity from AWQ's, for RTN and GPTQ.

    python benchmarks/quant_drift.py runs/quickstart
    python benchmarks/quant_drift.py runs/quickstart --max-tokens 20000 --json
    python benchmarks/quant_drift.py runs/quickstart --rows sensitivity   # which layers 4 bits hurt most

Nothing here asserts a bound; the regression budgets live in the tests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fanformer.checkpoint import WEIGHTS_FILE, load_config
from fanformer.runtime.variants import FAN_PROJECTION as FAN
# row label -> (method, options)
ROWS = {
    "RTN w4 g128": ("rtn", dict(bits=4, group_size=128)),
    "GPTQ w4 g128": ("gptq", dict(bits=4, group_size=128)),
    "AWQ w4 g128": ("awq", dict(bits=4, group_size=128)),
    "AWQ w4 g128, scales only": ("awq", dict(bits=4, group_size=128, search_clip=False)),
    "AWQ w4 g128, clipping only": ("awq", dict(bits=4, group_size=128, search_scale=False)),
    "AWQ w4 g128, FAN projection kept": ("awq", dict(bits=4, group_size=128, keep=(FAN,))),
    "RTN w4 g128, FAN projection kept": ("rtn", dict(bits=4, group_size=128, keep=(FAN,))),
    "GPTQ w4 g128, FAN projection kept": ("gptq", dict(bits=4, group_size=128, keep=(FAN,))),
    "RTN w4 g32": ("rtn", dict(bits=4, group_size=32)),
    "GPTQ w4 g32": ("gptq", dict(bits=4, group_size=32)),
    "AWQ w4 g32": ("awq", dict(bits=4, group_size=32)),
    "RTN w3 g32": ("rtn", dict(bits=3, group_size=32)),
    "GPTQ w3 g32": ("gptq", dict(bits=3, group_size=32)),
    "AWQ w3 g32": ("awq", dict(bits=3, group_size=32)),
    "RTN w8 g128": ("rtn", dict(bits=8, group_size=128)),
}
# Per-layer sensitivity (on request: --rows sensitivity): RTN w4 g128 with one kind of layer
# kept float at a time, so the KL each layer's rounding costs can be set against its bytes.
LAYERS = {"FAN projection": FAN, **{name: f"blocks.*.{path}" for name, path in (
    ("q_proj", "attn.q_proj"), ("k_proj", "attn.k_proj"), ("v_proj", "attn.v_proj"), ("o_proj", "attn.o_proj"),
    ("gate_proj", "ffn.gate_proj"), ("up_proj", "ffn.up_proj"), ("down_proj", "ffn.down_proj"))}}
SENSITIVITY = {f"RTN w4 g128, {name} kept": ("rtn", dict(bits=4, group_size=128, keep=(pattern,)))
               for name, pattern in LAYERS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a trained float checkpoint")
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, *SENSITIVITY, "sensitivity"], default=list(ROWS),
                        metavar="ROW", help="row labels, or 'sensitivity' for one RTN row per kept layer kind")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, help="default min(512, max_seq_len)")
    parser.add_argument("--max-tokens", type=int, default=20000, help="held-out tokens scored (default 20000)")
    parser.add_argument("--ctx", type=int, help="evaluation window (default min(512, max_seq_len))")
    parser.add_argument("--work", help="folder for the quantized checkpoints (default: a temporary one)")
    parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from fanformer.quant.checkpoint import quantize_checkpoint
    from fanformer.quant import methods
    from fanformer.quant.config import CalibratedConfig
    from fanformer.runtime import drift, eval_tokens, fp16_reference, load_backend

    checkpoint = Path(args.checkpoint)
    max_seq_len = load_config(checkpoint).max_seq_len
    seq_len, ctx = args.calib_seq_len or min(512, max_seq_len), args.ctx or min(512, max_seq_len)
    work = Path(args.work or tempfile.mkdtemp(prefix="fanformer-quant-drift-"))
    reference = fp16_reference(checkpoint)
    tokens = eval_tokens(reference.tokenizer, None, "test", args.max_tokens, args.cache_dir)
    results = {}
    rows = {**ROWS, **SENSITIVITY}
    labels = [label for row in args.rows for label in (SENSITIVITY if row == "sensitivity" else [row])]
    if "sensitivity" in args.rows:
        labels.insert(0, "RTN w4 g128")  # the baseline the kept rows are read against
    for label in dict.fromkeys(labels):
        method, options = rows[label]
        if issubclass(methods()[method], CalibratedConfig):
            options = dict(options, calib_samples=args.calib_samples, calib_seq_len=seq_len)
        out = work / label.replace(" ", "_").replace(",", "")
        report = quantize_checkpoint(checkpoint, methods()[method](**options), out, force=True,
                                     cache_dir=args.cache_dir, progress=False)
        result = drift(load_backend(out), reference, tokens, ctx=ctx, progress=False).to_dict()
        results[label] = {"file_bytes": (out / WEIGHTS_FILE).stat().st_size, "quantize_seconds": report["seconds"],
                          **{k: result[k] for k in ("ppl_change", "kl_mean", "kl_stderr", "top1_agreement")}}
        print(f"{label}: {results[label]}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"\n{checkpoint}: {len(tokens):,} held-out tokens at ctx {ctx}, calibration {args.calib_samples} x {seq_len}\n")
    print("| quantized | file | ppl change | mean KL | top-1 agreement | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['file_bytes'] / 1e6:.2f} MB | {100 * r['ppl_change']:+.2f}% | "
              f"{r['kl_mean']:.4f} ± {r['kl_stderr']:.4f} | {100 * r['top1_agreement']:.1f}% | "
              f"{r['quantize_seconds']:.1f} |")


if __name__ == "__main__":
    main()
