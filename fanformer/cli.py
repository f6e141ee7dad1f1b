"""The `fanformer` command line: a thin layer of subcommands over the library.

Each subcommand is a plain function taking parsed arguments; config fields become
flags automatically (`--n-layers 4`, `--p 0`, `--norm pre`, ...). A `FANformerError`
is printed as one line and exits with status 2; anything else is a bug and keeps its
traceback. A subcommand that gives a verdict returns its exit status: `drift` (and
`quickstart`, which ends with the drift table) exit 1 when a variant is over its drift
budget or failed to build or run, so a script can tell a bad model (1) from a bad
command line (2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError
from fanformer.training import TrainConfig

log = logging.getLogger("fanformer")

QUICKSTART_OUT = "runs/quickstart"
# Small enough to train in a few minutes on 2 CPU cores, big enough to write Python-looking text.
QUICKSTART_MODEL = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        ffn_dim=384, max_seq_len=256)
QUICKSTART_TRAIN = dict(max_steps=600, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=50,
                        eval_every=200, save_every=200, log_every=10)
# The drift table of the quickstart: every default variant, on few enough held-out tokens
# and calibration windows to take a few minutes on 2 cores.
QUICKSTART_DRIFT = dict(max_tokens=4096, calib_samples=64)


# --- Dataclass fields as flags ------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, show_defaults: bool = True) -> None:
    """One optional flag per field; unset flags stay None so presets and saved state win."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind not in (int, float, str, bool):
            continue
        help_text = f.metadata.get("help", "")
        if show_defaults:
            help_text += f" (default {f.default})"
        dest = f"{cls.__name__}.{f.name}"
        if kind is bool:  # `--compile` alone means true; `--compile false` is also accepted
            group.add_argument(_flag(f.name), dest=dest, default=None, nargs="?", const=True,
                               type=_parse_bool, metavar="BOOL", help=help_text.strip() or None)
        else:
            group.add_argument(_flag(f.name), dest=dest, default=None, type=kind,
                               metavar=kind.__name__.upper(), help=help_text.strip() or None)


def dataclass_overrides(args: argparse.Namespace, cls) -> dict:
    prefix = f"{cls.__name__}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


# --- Subcommands ----------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    """Train a FANformer (from a preset, or resume a checkpoint) and save it to --out."""
    from fanformer.pipeline import train_run

    train_run(out=args.out, preset=args.preset, data=args.data, resume=args.resume, force=args.force,
              model_overrides=dataclass_overrides(args, FANformerConfig),
              train_overrides=dataclass_overrides(args, TrainConfig), tokenizer_path=args.tokenizer,
              cache_dir=args.cache_dir, progress=not args.quiet)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the config and exact parameter count of a preset or checkpoint."""
    import torch

    from fanformer.checkpoint import load_config
    from fanformer.model import FANformer, count_parameters

    target = args.preset or args.checkpoint
    if target is None:
        raise FANformerError("give a preset name (--preset tiny) or a checkpoint directory")
    if target in PRESETS:
        config = FANformerConfig.from_name(target, **dataclass_overrides(args, FANformerConfig))
    elif Path(target).exists():
        config = load_config(target)
    else:
        raise FANformerError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    with torch.device("meta"):
        n_params = count_parameters(FANformer(config))
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": n_params}, indent=2))
        return
    width = max(len(k) for k in config.to_dict())
    for key, value in config.to_dict().items():
        print(f"{key:<{width}}  {value}")
    print(f"{'parameters':<{width}}  {n_params:,}")


def generation_config(args: argparse.Namespace, defaults: dict):
    """Flags first, then the model's generation_config.json, then GenerationConfig's own defaults."""
    from runtime.generation import GenerationConfig

    def pick(flag, key):
        value = getattr(args, flag)
        return value if value is not None else defaults.get(key)

    temperature = pick("temperature", "temperature")
    if args.greedy or (args.temperature is None and defaults.get("do_sample") is False):
        temperature = 0.0
    chosen = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                  min_length=pick("min_length", "min_length"), temperature=temperature,
                  top_k=pick("top_k", "top_k"), top_p=pick("top_p", "top_p"),
                  repetition_penalty=pick("repetition_penalty", "repetition_penalty"),
                  stop=tuple(args.stop or ()), seed=args.seed)
    return GenerationConfig(**{k: v for k, v in chosen.items() if v is not None})


def backend_options(args: argparse.Namespace) -> dict:
    return {"device": args.device, **({"dtype": args.dtype} if args.dtype else {})}


def cmd_export(args: argparse.Namespace) -> None:
    """Export a checkpoint to ONNX (a folder onnxruntime and onnxruntime-genai run as is) or GGUF (one file)."""
    from export import export

    flags = {"onnx": {"dtype": "--dtype", "quantize": "--quantize", "block_size": "--block-size"},
             "gguf": {"type": "--type", "arch": "--arch"}}
    for fmt, owned in flags.items():
        given = [flag for name, flag in owned.items() if getattr(args, name) is not None]
        if fmt != args.format and given:
            raise FANformerError(f"{', '.join(given)} only apply to --format {fmt}")
    options = {name: getattr(args, name) for name in flags[args.format] if getattr(args, name) is not None}
    out = export(args.checkpoint, args.format, args.out, force=args.force, **options)
    print(f"wrote {out}")


BNB_METHODS = ("int8", "nf4")  # bitsandbytes: its own formats, no grid and no calibration


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize a checkpoint's linear layers at --out: RTN, GPTQ or AWQ into a GPTQ-layout
    checkpoint, or bitsandbytes int8 (LLM.int8()) / nf4."""
    from quant.checkpoint import quantize_checkpoint

    config = bnb_config(args) if args.method in BNB_METHODS else grid_config(args)
    report = quantize_checkpoint(args.checkpoint, config, args.out, force=args.force, calib_data=args.calib_data,
                                 cache_dir=args.cache_dir, progress=not args.quiet)
    print(format_quant_report(report))
    print(f"wrote {args.out}")


def grid_config(args: argparse.Namespace):
    """The rtn / gptq / awq config from the flags."""
    from fanformer.checkpoint import load_config
    from quant.config import CONFIGS

    if args.double_quant:
        raise FANformerError("--double-quant only applies to --method nf4")
    calibrated = {"--calib-data": args.calib_data, "--calib-samples": args.calib_samples,
                  "--calib-seq-len": args.calib_seq_len}
    bits = 4 if args.bits is None else args.bits
    group_size = 128 if args.group_size is None else args.group_size
    options = dict(bits=bits, group_size=group_size, sym=args.sym is not False, keep=tuple(args.keep or ()),
                   lm_head=args.lm_head)
    if args.act_order and args.method != "gptq":
        raise FANformerError("--act-order only applies to --method gptq")
    if args.method in ("gptq", "awq"):
        max_seq_len = load_config(args.checkpoint).max_seq_len
        options.update(calib_samples=args.calib_samples or 128,
                       calib_seq_len=args.calib_seq_len or min(512, max_seq_len), seed=args.seed)
        if args.method == "gptq":
            options.update(act_order=args.act_order)
    elif any(value is not None for value in calibrated.values()):
        given = [flag for flag, value in calibrated.items() if value is not None]
        raise FANformerError(f"{', '.join(given)} only apply to --method gptq or awq")
    return CONFIGS[args.method](**options)


def bnb_config(args: argparse.Namespace):
    """The int8 / nf4 config: only --keep, --lm-head (and nf4's --double-quant) apply."""
    from quant.config import CONFIGS

    grid_flags = {"--bits": args.bits, "--group-size": args.group_size, "--sym/--asym": args.sym,
                  "--act-order": args.act_order or None, "--calib-data": args.calib_data,
                  "--calib-samples": args.calib_samples, "--calib-seq-len": args.calib_seq_len}
    given = [flag for flag, value in grid_flags.items() if value is not None]
    if given:
        raise FANformerError(f"{', '.join(given)} do not apply to --method {args.method} (bitsandbytes has no grid "
                             "and no calibration); leave them out, or use --method rtn, gptq or awq")
    if args.double_quant and args.method != "nf4":
        raise FANformerError("--double-quant only applies to --method nf4")
    options = dict(keep=tuple(args.keep or ()), lm_head=args.lm_head)
    if args.double_quant:
        options.update(double_quant=True)
    return CONFIGS[args.method](**options)


def format_quant_report(report: dict) -> str:
    layers = report["layers"]
    width = max(len(name) for name in layers)
    metric = next(iter(layers.values()))["metric"]
    lines = [f"{'layer':<{width}}  {'shape':>12}  {metric:>12}"]
    for name, layer in layers.items():
        lines.append(f"{name:<{width}}  {'x'.join(map(str, layer['shape'])):>12}  {layer['error']:>12.4g}")
    config = report["config"]
    if "bits" in config:
        setting = f"{config['bits']}-bit, group size {config['group_size']}, {'sym' if config['sym'] else 'asym'}"
    else:  # bitsandbytes: its own few options
        setting = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in config.items()
                            if key not in ("keep", "lm_head"))
    lines.append(f"{report['method']} {setting}: {len(layers)} layers quantized, "
                 f"{len(report['kept'])} linear(s) left in float, {report['seconds']:.1f} s")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate text with KV caching from a checkpoint or exported model; interactive without --prompt."""
    from runtime import generate, load_backend

    backend = load_backend(args.path, format=args.format, **backend_options(args))
    config = generation_config(args, backend.generation_defaults)

    def stream(prompt: str) -> None:
        print(prompt, end="", flush=True)
        generate(backend, [prompt], config, on_text=lambda _, delta: print(delta, end="", flush=True))
        print(flush=True)

    if args.prompt and len(args.prompt) > 1:
        for prompt, result in zip(args.prompt, generate(backend, args.prompt, config)):
            print(prompt + result.text, end="\n\n", flush=True)
    elif args.prompt:
        stream(args.prompt[0])
    else:
        interactive(stream)


def interactive(stream) -> None:
    """One prompt per line until end of input (Ctrl-D); blank lines are skipped."""
    tty = sys.stdin.isatty()
    if tty:
        print("interactive mode: type a prompt and press Enter; Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if line.strip():
            stream(line.replace("\\n", "\n"))


def cmd_eval(args: argparse.Namespace) -> None:
    """Perplexity of a model on held-out text; with --reference, its drift against that model."""
    from runtime import drift, eval_tokens, fp16_reference, load_backend, perplexity
    from runtime.backend import detect_format
    from runtime.perplexity import check_ctx

    backend = load_backend(args.path, format=args.format, **backend_options(args))
    ctx = args.ctx or min(512, backend.info.max_seq_len)
    check_ctx(backend, ctx)
    tokens = eval_tokens(backend.tokenizer, args.data, args.split, args.max_tokens, args.cache_dir)
    options = dict(protocol=args.protocol, ctx=ctx, stride=args.stride, batch_size=args.batch_size,
                   progress=not args.quiet)
    if args.reference is None:
        result = perplexity(backend, tokens, **options).to_dict()
    else:
        if args.reference_precision == "fp16" and detect_format(args.reference) == "pytorch":
            reference = fp16_reference(args.reference, device=str(backend.info.device))
        else:
            reference = load_backend(args.reference, device=args.device)
        result = drift(backend, reference, tokens, **options).to_dict()
        result["reference_info"] = vars(reference.info)
    result["model_info"] = vars(backend.info)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_eval(result))


def format_eval(result: dict) -> str:
    def ppl_line(label: str, ppl: dict, info: dict) -> str:
        return (f"{label:<12}{ppl['ppl']:>10.3f} ± {ppl['ppl_stderr']:<8.3f}  "
                f"{info['path']} ({info['format']}, {info['dtype']}, {info['device']})")

    drift_mode = "kl_mean" in result
    first = result["model"] if drift_mode else result
    stride = f", stride {first['stride']}" if first["stride"] else ""
    lines = [f"scored {first['tokens']:,} tokens ({first['protocol']}, ctx {first['ctx']}{stride})",
             f"{'':<12}{'ppl':>10}"]
    lines.append(ppl_line("model", first, result["model_info"]))
    if drift_mode:
        lines += [ppl_line("reference", result["reference"], result["reference_info"]),
                  f"{'ppl change':<12}{100 * result['ppl_change']:>+10.4f} %",
                  f"{'mean KL':<12}{result['kl_mean']:>10.3g} ± {result['kl_stderr']:.2g}   "
                  f"(99th percentile {result['kl_p99']:.3g})",
                  f"{'top-1 agree':<12}{100 * result['top1_agreement']:>10.3f} %"]
    return "\n".join(lines)


def cmd_drift(args: argparse.Namespace) -> int:
    """Take a float checkpoint through every variant (PyTorch fp16/bf16, bitsandbytes, RTN/GPTQ/AWQ,
    ONNX, GGUF, onnxruntime-genai), measure each against the FP16 reference on the same held-out
    tokens, write drift.json, drift.md and drift.png, and exit 1 if one is over budget or failed."""
    from runtime.drift_table import TableConfig, load_budgets, run_drift_table

    budgets = load_budgets(args.budget) if args.budget else None
    config = TableConfig(**({"variants": tuple(args.variants)} if args.variants else {}), split=args.split,
                         max_tokens=args.max_tokens or None, ctx=args.ctx, batch_size=args.batch_size,
                         device=args.device, calib_samples=args.calib_samples, speed=not args.no_speed,
                         threads=args.threads)
    table = run_drift_table(args.checkpoint, args.out, config, data=args.data, budgets=budgets,
                            cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
    return print_drift_table(table)


def print_drift_table(table) -> int:
    """Print the table and where it went; the exit status of its verdict (0 pass, 1 fail)."""
    from runtime.drift_table import ARTIFACTS, markdown

    print(markdown(table))
    print(f"wrote {Path(table.out) / 'drift.json'}, drift.md and drift.png; the variants are in "
          f"{Path(table.out) / ARTIFACTS}")
    for row in table.breaches:
        print(f"fanformer: {row.variant} {row.status}: {row.reason}", file=sys.stderr)
    return 0 if table.passed else 1


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The whole story on the default corpus in about ten minutes on 2 CPU cores: train a small
    FANformer, export it to ONNX and GGUF, quantize it (bitsandbytes int8, RTN, GPTQ, AWQ), print
    the drift table and a sample from the best 4-bit variant."""
    from fanformer.checkpoint import check_output_dir
    from fanformer.pipeline import train_run
    from runtime import GenerationConfig, generate, load_backend
    from runtime.drift_table import TableConfig, best_row, run_drift_table
    from runtime.variants import VARIANTS

    drift_out = Path(args.out).with_name(Path(args.out).name + "-drift")
    check_output_dir(drift_out, args.force)  # before the training, not after it
    train_overrides = dict(QUICKSTART_TRAIN)
    if args.max_steps:
        train_overrides["max_steps"] = args.max_steps
    train_run(out=args.out, preset="tiny", data=args.data, resume=False, force=args.force,
              model_overrides=dict(QUICKSTART_MODEL), train_overrides=train_overrides,
              progress=not args.quiet)
    print(f"\ncheckpoint: {args.out}\n")
    table = run_drift_table(args.out, drift_out, TableConfig(**QUICKSTART_DRIFT), data=args.data,
                            force=args.force, progress=not args.quiet)
    status = print_drift_table(table)
    best = best_row(table, bits=4)
    path, options = (best.path, VARIANTS[best.variant].load_options("cpu")) if best else (args.out, {})
    print(f"sample from {best.variant if best else 'the checkpoint'} ({path}):\n")
    prompt = "def "
    config = GenerationConfig(max_new_tokens=120, temperature=0.7, top_k=50)
    print(prompt + generate(load_backend(path, **options), [prompt], config)[0].text)
    return status


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run an experiment: `modular` is the paper's leave-square-out test, FANformer against a Transformer."""
    from fanformer.modular import RESULTS_FILE, TASKS, ExperimentConfig, format_results, run_experiment

    tasks = tuple(TASKS) if args.task == "both" else (args.task,)
    config = ExperimentConfig(tasks=tasks, **dataclass_overrides(args, ExperimentConfig))
    results = run_experiment(config, args.out, force=args.force, progress=not args.quiet)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_results(results))
        print(f"wrote {Path(args.out) / RESULTS_FILE}, heatmaps.png and the checkpoints in {args.out}")


def cmd_analyze(args: argparse.Namespace) -> None:
    """Analyse a checkpoint: `fourier` is the DFT of number-token representations (arXiv 2406.03445)."""
    from fanformer.fourier_analysis import analyze_checkpoint, format_analysis, save_analysis

    result = analyze_checkpoint(args.checkpoint, max_number=args.max_number, layers=args.layers, top=args.top)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(Path(args.checkpoint).name + "-fourier")
    written = save_analysis(result, out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_analysis(result))
        print(f"wrote {', '.join(str(path) for path in written)}")


COMMANDS = {"train": cmd_train, "info": cmd_info, "export": cmd_export, "generate": cmd_generate, "eval": cmd_eval,
            "quickstart": cmd_quickstart, "quantize": cmd_quantize, "drift": cmd_drift,
            "experiment": cmd_experiment, "analyze": cmd_analyze}


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory (later: exported ONNX folder or GGUF file)")
    parser.add_argument("--format", help="skip format detection (pytorch, ...)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                        help="compute dtype (default: fp32 for a checkpoint; an exported model's own)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanformer", description="Train FANformer language models and take them to the edge.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    train.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    train.add_argument("--data", nargs="+", help="files, folders or globs of .txt/.md/.py/.jsonl "
                       "(default: the Python standard library's source on this machine)")
    train.add_argument("--out", required=True, help="checkpoint directory to write")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out where it stopped")
    train.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    train.add_argument("--tokenizer", help="use this tokenizer.json (or checkpoint dir) instead of training one")
    train.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(train, FANformerConfig, "model config (each flag overrides the preset)", show_defaults=False)
    add_dataclass_flags(train, TrainConfig, "training")

    info = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    info.add_argument("checkpoint", nargs="?", help="checkpoint directory")
    info.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    info.add_argument("--json", action="store_true", help="print JSON")
    add_dataclass_flags(info, FANformerConfig, "model config (each flag overrides the preset)", show_defaults=False)

    from export import gguf_format

    exp = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    exp.add_argument("checkpoint", help="checkpoint directory")
    exp.add_argument("--format", required=True, choices=["onnx", "gguf"], help="output format")
    exp.add_argument("--dtype", choices=["fp32", "fp16"], help="onnx: weights and compute (default fp32)")
    # No argparse choices for these two: the exporter checks them (with the dtype) and says what to do.
    exp.add_argument("--quantize", help="int8 (dynamic), int4 or int8-wo (weight-only, MatMulNBits); default none")
    exp.add_argument("--block-size", type=int, help="int4/int8-wo block size: 32 (default), 64 or 128")
    exp.add_argument("--type", choices=list(gguf_format.WEIGHT_TYPES),
                     help=f"gguf: type of the 2-D weights (default {gguf_format.DEFAULT_WEIGHT_TYPE}; "
                          "1-D tensors stay f32)")
    exp.add_argument("--arch", choices=[gguf_format.ARCH, gguf_format.LLAMA_ARCH],
                     help="gguf: fanformer (default; every option) or llama (llama.cpp's own; "
                          "p=0 pre-norm models only)")
    exp.add_argument("--out", help="output folder (onnx; default <checkpoint>-onnx[-<dtype>][-<quantize>]) or file "
                                   "(gguf; default <checkpoint>[-llama]-<type>.gguf), beside the checkpoint")
    exp.add_argument("--force", action="store_true", help="overwrite an existing output")

    qz = sub.add_parser("quantize", help=cmd_quantize.__doc__, description=cmd_quantize.__doc__)
    qz.add_argument("checkpoint", help="float checkpoint directory")
    qz.add_argument("--method", required=True, choices=["rtn", "gptq", "awq", *BNB_METHODS],
                    help="rtn (round to nearest), gptq, awq, or bitsandbytes int8 (LLM.int8()) or nf4 (QLoRA's NF4)")
    # Grid flags default to None so that one given to int8/nf4 is refused (grid_config fills the defaults).
    qz.add_argument("--bits", type=int, help="8, 4, 3 or 2 (default 4)")
    qz.add_argument("--group-size", type=int, help="128 (default), 64, 32, or -1 (per channel)")
    sym = qz.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", default=None,
                     help="asymmetric grid (min-max with zero point)")
    qz.add_argument("--double-quant", action="store_true",
                    help="nf4: store the block absmaxes in 8 bits too (QLoRA's double quantization)")
    qz.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing Hessian diagonal")
    qz.add_argument("--calib-data", nargs="+", help="gptq/awq: corpus files/folders/globs whose TRAINING split "
                    "calibrates (default: the Python standard library)")
    qz.add_argument("--calib-samples", type=int, help="gptq/awq: calibration windows (default 128)")
    qz.add_argument("--calib-seq-len", type=int, help="gptq/awq: tokens per window (default min(512, max_seq_len))")
    qz.add_argument("--keep", action="append", metavar="PATTERN",
                    help="leave matching layers in float, e.g. 'blocks.*.attn.fan.proj' (repeatable)")
    qz.add_argument("--lm-head", action="store_true", help="quantize the LM head too (not when tied)")
    qz.add_argument("--seed", type=int, default=0, help="calibration window seed (default 0)")
    qz.add_argument("--out", required=True, help="quantized checkpoint directory to write")
    qz.add_argument("--force", action="store_true", help="overwrite an existing --out")
    qz.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    qz.add_argument("--quiet", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    add_backend_flags(gen)
    gen.add_argument("--prompt", action="append", help="text to continue (repeat for a batch); none = interactive")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 128)")
    gen.add_argument("--max-length", type=int, help="prompt + generated tokens, as in transformers")
    gen.add_argument("--min-length", type=int, help="prompt + generated tokens before EOS may end the text")
    gen.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config.json)")
    gen.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
    gen.add_argument("--repetition-penalty", type=float, help="CTRL repetition penalty (1 = off)")
    gen.add_argument("--stop", action="append", help="stop when this string is produced (repeatable)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")

    ev = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    add_backend_flags(ev)
    ev.add_argument("--data", nargs="+", help="corpus files/folders/globs (default: the Python standard library)")
    ev.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                    help="held-out split of --data to score, or all of it (default test)")
    ev.add_argument("--ctx", type=int, help="context window (default min(512, the model's maximum))")
    ev.add_argument("--stride", type=int, help="sliding-window stride (default ctx/2)")
    ev.add_argument("--protocol", default="sliding", choices=["sliding", "chunks"],
                    help="sliding: every token scored once (Hugging Face); chunks: llama.cpp's llama-perplexity")
    ev.add_argument("--max-tokens", type=int, help="score only the first N tokens of the split")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    ev.add_argument("--reference", help="compare against this model: drift, KL divergence, top-1 agreement")
    ev.add_argument("--reference-precision", default="fp16", choices=["fp16", "native"],
                    help="a full-precision reference checkpoint is rounded to fp16 first (default) or used as is")
    ev.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    dr = sub.add_parser("drift", help=cmd_drift.__doc__, description=cmd_drift.__doc__)
    dr.add_argument("checkpoint", help="float checkpoint directory")
    dr.add_argument("--data", nargs="+", help="corpus files/folders/globs: its held-out split is scored, its training "
                    "split calibrates GPTQ/AWQ (default: the Python standard library)")
    dr.add_argument("--variants", nargs="+", metavar="NAME",
                    help="variants to measure, e.g. gptq-w4g128 gguf-q4_0 (default: every one of runtime/variants.py "
                         "but gptq-w4g128-onnx; an unknown name lists them)")
    dr.add_argument("--out", help="folder for drift.json, drift.md, drift.png and the built artifacts/ "
                                  "(default <checkpoint>-drift)")
    dr.add_argument("--budget", help="JSON file: variant -> {max_ppl_change, max_kl_mean, min_top1}, overriding "
                                     "the defaults for the variants it names (see tests/drift_budget.json)")
    dr.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                    help="split of --data to score (default test)")
    dr.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (default 8192; 0 = all)")
    dr.add_argument("--ctx", type=int, help="context window (default min(512, the model's maximum)), stride ctx/2")
    dr.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    dr.add_argument("--calib-samples", type=int, default=128, help="GPTQ/AWQ calibration windows (default 128)")
    dr.add_argument("--device", default="cpu", help="cpu (default), cuda or auto; a variant that cannot run there "
                                                    "runs on the CPU")
    dr.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1: reproducible "
                                                          "timings on a shared machine)")
    dr.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s and peak memory columns")
    dr.add_argument("--force", action="store_true", help="replace the table and artifacts in an existing --out")
    dr.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
    dr.add_argument("--quiet", action="store_true", help="no progress bar")

    quick = sub.add_parser("quickstart", help=cmd_quickstart.__doc__, description=cmd_quickstart.__doc__)
    quick.add_argument("--out", default=QUICKSTART_OUT, help=f"checkpoint directory (default {QUICKSTART_OUT})")
    quick.add_argument("--data", nargs="+", help="corpus (default: the Python standard library's source)")
    quick.add_argument("--max-steps", type=int, default=0, help=f"training steps (default {QUICKSTART_TRAIN['max_steps']})")
    quick.add_argument("--force", action="store_true", help="overwrite a previous quickstart run (checkpoint and "
                                                           "<out>-drift)")
    quick.add_argument("--quiet", action="store_true", help="no progress bar")

    from fanformer.modular import ExperimentConfig

    experiment = sub.add_parser("experiment", help=cmd_experiment.__doc__, description=cmd_experiment.__doc__)
    which = experiment.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    modular = which.add_parser("modular", help="leave-square-out on (a + b) mod 113 and a + 2b + 3",
                               description="Train FANformer and a p = 0 Transformer of equal parameter count on "
                                           "c = (a + b) mod 113 and c = a + 2b + 3 with a 21 x 21 square of (a, b) "
                                           "held out; report accuracy on the training pairs and in the square.")
    modular.add_argument("--task", default="both", choices=["add_mod", "linear", "both"], help="(default both)")
    modular.add_argument("--out", default="runs/modular", help="results, heat maps and checkpoints "
                                                               "(default runs/modular)")
    modular.add_argument("--json", action="store_true", help="print the results as JSON")
    modular.add_argument("--force", action="store_true", help="overwrite an existing --out")
    modular.add_argument("--quiet", action="store_true", help="no progress")
    add_dataclass_flags(modular, ExperimentConfig, "experiment")

    analyze = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    what = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    fourier = what.add_parser("fourier", help="Fourier spectrum and dominant periods of number tokens",
                              description="DFT over the number axis of the embeddings (and hidden states) of the "
                                          "tokens '0'..'N'; prints the dominant periods and plots the spectrum.")
    fourier.add_argument("checkpoint", help="checkpoint directory whose tokenizer has the number tokens")
    fourier.add_argument("--max-number", type=int, help="analyse 0..N (default: the longest run of number "
                                                        "tokens from 0)")
    fourier.add_argument("--layers", action="store_true", help="also the hidden state after every block")
    fourier.add_argument("--top", type=int, default=5, help="dominant periods to report (default 5)")
    fourier.add_argument("--out", help="folder for fourier.png and fourier.json (default <checkpoint>-fourier)")
    fourier.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our packages report progress at INFO; libraries (exporters, optimizers) only warnings.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for package in ("fanformer", "runtime", "export"):
        logging.getLogger(package).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args)
    except FANformerError as err:
        print(f"fanformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fanformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0  # None from the subcommands without a verdict


if __name__ == "__main__":
    sys.exit(main())
