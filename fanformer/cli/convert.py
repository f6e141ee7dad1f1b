"""`fanformer export`, `fanformer quantize` and `fanformer imatrix`: the formats, methods and
flags of the first two come from the registries (`fanformer.export.formats()`,
`fanformer.quant.methods()`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fanformer.cli.flags import add_option_flags, given_options, inapplicable, positive_int
from fanformer.errors import FANformerError
from fanformer.quant.config import GPTQ_GRID


def cmd_export(args: argparse.Namespace) -> None:
    """Export a checkpoint to ONNX (a folder onnxruntime and onnxruntime-genai run as is) or GGUF (one file)."""
    from fanformer.export import export, formats
    from fanformer.runtime.validation import VALIDATORS

    options = given_options(args)
    known = {name: fmt.options for name, fmt in formats().items()}
    problem = inapplicable(options, known[args.format], known, args.shown, "--format", args.format, args.argv)
    if problem:
        raise FANformerError(problem)
    out = export(args.checkpoint, args.format, args.out, force=args.force, validate=VALIDATORS.get(args.format),
                 **options)
    print(f"wrote {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize a checkpoint's linear layers at --out: RTN, GPTQ or AWQ into a GPTQ-layout
    checkpoint, or bitsandbytes int8 (LLM.int8()) / nf4."""
    import dataclasses

    from fanformer.quant import method_config, methods
    from fanformer.quant.checkpoint import quantize_checkpoint

    options = given_options(args)
    known = methods()
    problem = inapplicable(options, known[args.method], known, args.shown, "--method", args.method, args.argv)
    calibrated = [name for name, cls in known.items() if "calib_samples" in {f.name for f in dataclasses.fields(cls)}]
    if problem is None and args.calib_data and args.method not in calibrated:
        problem = f"--calib-data only applies to --method {' or '.join(calibrated)}"
    if problem:
        raise FANformerError(problem)
    report = quantize_checkpoint(args.checkpoint, method_config(args.method, **options), args.out, force=args.force,
                                 calib_data=args.calib_data, cache_dir=args.cache_dir, progress=not args.quiet)
    print(format_quant_report(report))
    print(f"wrote {args.out}")


def cmd_imatrix(args: argparse.Namespace) -> None:
    """Compute an importance matrix: each linear layer's per-column mean of x^2 over calibration
    text, written as llama.cpp's imatrix GGUF (for `fanformer export --format gguf --imatrix`
    and llama.cpp's `llama-quantize --imatrix`)."""
    from fanformer.export.gguf_imatrix import make_imatrix

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_name(f"{checkpoint.name}.imatrix.gguf")
    out, chunks, ctx = make_imatrix(checkpoint, out, args.calib_data, args.chunks, args.ctx, args.cache_dir,
                                    progress=not args.quiet, force=args.force)
    print(f"wrote {out} ({chunks} chunks of {ctx} tokens)")


def format_quant_report(report: dict) -> str:
    layers = report["layers"]
    width = max(len(name) for name in layers)
    metric = next(iter(layers.values()))["metric"]
    lines = [f"{'layer':<{width}}  {'shape':>12}  {metric:>12}"]
    for name, layer in layers.items():
        lines.append(f"{name:<{width}}  {'x'.join(map(str, layer['shape'])):>12}  {layer['error']:>12.4g}")
    config = report["config"]
    if config.get("grid", GPTQ_GRID) != GPTQ_GRID:
        setting = f"llama.cpp's {config['grid'].upper()} mixture, Q4_K's grid"
    elif "bits" in config:
        setting = f"{config['bits']}-bit, group size {config['group_size']}, {'sym' if config['sym'] else 'asym'}"
    else:  # bitsandbytes: its own few options
        setting = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in config.items()
                            if key not in ("keep", "lm_head"))
    lines.append(f"{report['method']} {setting}: {len(layers)} layers quantized, "
                 f"{len(report['kept'])} linear(s) left in float, {report['seconds']:.1f} s")
    return "\n".join(lines)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = RUN[name].__doc__
    if name == "imatrix":
        parser.add_argument("checkpoint", help="float checkpoint directory")
        parser.add_argument("--calib-data", nargs="+", help="corpus files/folders/globs whose TRAINING split "
                            "calibrates (default: the Python standard library)")
        parser.add_argument("--chunks", type=positive_int, default=64, help="calibration windows (default 64)")
        parser.add_argument("--ctx", type=positive_int, default=512,
                            help="tokens per window, capped at the model's context (default 512)")
        parser.add_argument("--out", help="output file (default <checkpoint>.imatrix.gguf beside it)")
        parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
        parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        return
    if name == "export":
        from fanformer.export import formats

        known = formats()
        parser.add_argument("checkpoint", help="checkpoint directory")
        parser.add_argument("--format", required=True, choices=list(known),
                            help="; ".join(f"{n}: {fmt.summary}" for n, fmt in known.items()))
        shown = add_option_flags(parser, {n: fmt.options for n, fmt in known.items()}, "format options")
        parser.add_argument("--out", help="output path (default beside the checkpoint: onnx "
                            "<checkpoint>-onnx[-<dtype>][-<quantize>], gguf <checkpoint>[-llama]-<type>.gguf)")
        parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    else:
        from fanformer.quant import methods

        known = methods()
        parser.add_argument("checkpoint", help="float checkpoint directory")
        parser.add_argument("--method", required=True, choices=list(known),
                            help="; ".join(f"{n}: {summary(cls)}" for n, cls in known.items()))
        shown = add_option_flags(parser, known, "method options")
        parser.add_argument("--calib-data", nargs="+", help="gptq/awq: corpus files/folders/globs whose TRAINING "
                            "split calibrates (default: the Python standard library)")
        parser.add_argument("--out", required=True, help="quantized checkpoint directory to write")
        parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
        parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(shown=shown)


def summary(cls: type) -> str:
    """A config class's docstring up to its first colon or full stop: "GPTQ (Frantar et al. 2022)"."""
    first = (cls.__doc__ or cls.__name__).strip().replace("\n", " ")
    return re.split(r"(?<=\))[.:]\s|:\s|\.\s(?=[A-Z])", first)[0].replace("%", "%%")


RUN = {"export": cmd_export, "quantize": cmd_quantize, "imatrix": cmd_imatrix}


def run(name: str, args: argparse.Namespace):
    return RUN[name](args)
