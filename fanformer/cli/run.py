"""`fanformer generate`, `eval` and `drift`: running any form of a model through the runtime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fanformer.cli.flags import non_negative_int, positive_int


def generation_config(args: argparse.Namespace, defaults: dict):
    """Flags first, then the model's generation_config.json, then GenerationConfig's own defaults."""
    from fanformer.runtime.generation import GenerationConfig

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


# The formats whose backends take a thread count (ggml's, onnxruntime's, onnxruntime-genai's).
THREADED_FORMATS = ("gguf", "onnx", "genai")


def backend_options(args: argparse.Namespace) -> dict:
    from fanformer.errors import FANformerError
    from fanformer.runtime.backend import detect_format

    options = {"device": args.device, **({"dtype": args.dtype} if args.dtype else {})}
    if args.engine is None and args.threads is None:
        return options
    format = args.format or detect_format(args.path)
    if args.engine is not None and format != "gguf":
        raise FANformerError(f"--engine applies to GGUF files only; {args.path} is not one")
    if args.threads is not None and format not in THREADED_FORMATS:
        raise FANformerError(f"--threads applies to GGUF files and ONNX folders only; {args.path} is a {format} "
                             "model (torch uses its own setting: OMP_NUM_THREADS)")
    return {**options, **{name: value for name, value in (("engine", args.engine), ("threads", args.threads))
                          if value is not None}}


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate text with KV caching from a checkpoint or exported model; interactive without --prompt."""
    from fanformer.runtime import generate, load_backend
    from fanformer.runtime.generation import check_prompts

    backend = load_backend(args.path, format=args.format, **backend_options(args))
    config = generation_config(args, backend.generation_defaults)

    def warn_if_cut(results) -> None:
        if any(result.finish_reason == "context" for result in results):
            print(f"fanformer generate: warning: stopped at the model's context of {backend.info.max_seq_len} "
                  "tokens (prompt + generated) before the requested length; ask for fewer new tokens or give a "
                  "shorter prompt", file=sys.stderr)

    def stream(prompt: str) -> None:
        check_prompts(backend, [prompt], config)  # a prompt that is refused is never echoed
        print(prompt, end="", flush=True)
        results = generate(backend, [prompt], config, on_text=lambda _, delta: print(delta, end="", flush=True))
        print(flush=True)
        warn_if_cut(results)

    if args.prompt and len(args.prompt) > 1:
        results = generate(backend, args.prompt, config)
        for prompt, result in zip(args.prompt, results):
            print(prompt + result.text, end="\n\n", flush=True)
        warn_if_cut(results)
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
    from fanformer.runtime import drift, eval_tokens, fp16_reference, load_backend, perplexity
    from fanformer.runtime.backend import detect_format
    from fanformer.runtime.perplexity import check_ctx

    backend = load_backend(args.path, format=args.format, **backend_options(args))
    ctx = args.ctx if args.ctx is not None else min(512, backend.info.max_seq_len)
    check_ctx(backend, ctx)
    tokens = eval_tokens(backend.tokenizer, args.data, args.split, args.max_tokens, args.cache_dir)
    if not args.quiet and not args.json:
        limit = "" if args.max_tokens else "; --max-tokens N scores fewer"
        print(f"scoring {len(tokens):,} tokens of the {args.split} split at ctx {ctx}{limit}", file=sys.stderr)
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
    from fanformer.runtime.drift_budgets import load_budgets
    from fanformer.runtime.drift_table import TableConfig, run_drift_table

    budgets = load_budgets(args.budget) if args.budget else None
    config = TableConfig(**({"variants": tuple(args.variants)} if args.variants else {}), split=args.split,
                         max_tokens=args.max_tokens or None, ctx=args.ctx, batch_size=args.batch_size,
                         device=args.device, speed=not args.no_speed,
                         **({"calib_samples": args.calib_samples} if args.calib_samples else {}),
                         threads=args.threads)
    table = run_drift_table(args.checkpoint, args.out, config, data=args.data, budgets=budgets,
                            cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
    return print_drift_table(table)


def print_drift_table(table) -> int:
    """Print the table and where it went; the exit status of its verdict (0 pass, 1 fail)."""
    from fanformer.runtime.drift_report import markdown
    from fanformer.runtime.drift_table import ARTIFACTS

    print(markdown(table))
    print(f"wrote {Path(table.out) / 'drift.json'}, drift.md and drift.png; the variants are in "
          f"{Path(table.out) / ARTIFACTS}")
    for row in table.breaches:
        print(f"fanformer: {row.variant} {row.status}: {row.reason}", file=sys.stderr)
    return 0 if table.passed else 1


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint (float or quantized), an exported ONNX folder or a GGUF file")
    parser.add_argument("--format", help="skip format detection: pytorch, onnx, genai or gguf")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                        help="compute dtype (default: fp32 for a checkpoint; an exported model's own)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    parser.add_argument("--engine", choices=["auto", "ggml", "torch"],
                        help="GGUF files: ggml (llama.cpp's kernels) or torch (default auto: ggml where ggml-python loads)")
    parser.add_argument("--threads", type=positive_int, help="GGUF files and ONNX folders: CPU threads (default: one per "
                        "physical core for ggml and onnxruntime, torch's own setting for the torch engine)")


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = RUN[name].__doc__
    if name == "generate":
        add_backend_flags(parser)
        parser.add_argument("--prompt", action="append", help="text to continue (repeat for a batch); none = interactive")
        parser.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate (default 128)")
        parser.add_argument("--max-length", type=positive_int, help="prompt + generated tokens, as in transformers")
        parser.add_argument("--min-length", type=non_negative_int, help="prompt + generated tokens before EOS may end the text")
        parser.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config.json)")
        parser.add_argument("--top-k", type=non_negative_int, help="keep the k most likely tokens (0 = off)")
        parser.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
        parser.add_argument("--repetition-penalty", type=float, help="CTRL repetition penalty (1 = off)")
        parser.add_argument("--stop", action="append", help="stop when this string is produced (repeatable)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    elif name == "eval":
        add_backend_flags(parser)
        parser.add_argument("--data", nargs="+", help="corpus files/folders/globs (default: the Python standard library)")
        parser.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                            help="held-out split of --data to score, or all of it (default test)")
        parser.add_argument("--ctx", type=positive_int, help="context window (default min(512, the model's maximum))")
        parser.add_argument("--stride", type=positive_int, help="sliding-window stride (default ctx/2)")
        parser.add_argument("--protocol", default="sliding", choices=["sliding", "chunks"],
                            help="sliding: every token scored once (Hugging Face); chunks: llama.cpp's llama-perplexity")
        parser.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens of the split")
        parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
        parser.add_argument("--reference", help="compare against this model: drift, KL divergence, top-1 agreement")
        parser.add_argument("--reference-precision", default="fp16", choices=["fp16", "native"],
                            help="a full-precision reference checkpoint is rounded to fp16 first (default) or used as is")
        parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    elif name == "drift":
        parser.add_argument("checkpoint", help="float checkpoint directory")
        parser.add_argument("--data", nargs="+", help="corpus files/folders/globs: its held-out split is scored, its training "
                            "split calibrates GPTQ/AWQ (default: the Python standard library)")
        parser.add_argument("--variants", nargs="+", metavar="NAME",
                            help="variants to measure, e.g. gptq-w4g128 gguf-q4_0 (default: every one of runtime/variants.py "
                            "but gptq-w4g128-onnx; an unknown name lists them)")
        parser.add_argument("--out", help="folder for drift.json, drift.md, drift.png and the built artifacts/ "
                            "(default <checkpoint>-drift)")
        parser.add_argument("--budget", help="JSON file: variant -> {max_ppl_change, max_kl_mean, min_top1}, overriding "
                            "the defaults for the variants it names (see tests/drift_budget.json)")
        parser.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                            help="split of --data to score (default test)")
        parser.add_argument("--max-tokens", type=non_negative_int, default=8192, help="score the first N tokens (default 8192; 0 = all)")
        parser.add_argument("--ctx", type=positive_int, help="context window (default min(512, the model's maximum)), stride ctx/2")
        parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
        parser.add_argument("--calib-samples", type=positive_int, help="GPTQ/AWQ calibration windows (default: the methods' own, 128)")
        parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto; a variant that cannot run there "
                            "runs on the CPU")
        parser.add_argument("--threads", type=positive_int, default=1, help="torch and onnxruntime threads (default 1: reproducible "
                            "timings on a shared machine)")
        parser.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s and peak memory columns")
        parser.add_argument("--force", action="store_true", help="replace the table and artifacts in an existing --out")
        parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


RUN = {"generate": cmd_generate, "eval": cmd_eval, "drift": cmd_drift}


def run(name: str, args: argparse.Namespace):
    return RUN[name](args)
