"""`fanformer train`, `info` and `quickstart`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fanformer.cli.flags import add_config_flags, config_overrides, positive_int
from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError

QUICKSTART_OUT = "runs/quickstart"
# How long `fanformer quickstart` takes, as measured (README's first command, fresh venv): the one
# statement of it, which --help prints and the README quotes (tests/test_readme.py checks they agree).
QUICKSTART_TIME = ("about 7 minutes on 2 idle CPU cores, install included (measured 2026-12-05, pip's "
                   "cache warm; about 16 with the test suite running beside it)")
# Small enough to train in a few minutes on 2 CPU cores, big enough to write Python-looking text.
QUICKSTART_MODEL = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                        ffn_dim=384, max_seq_len=256)
QUICKSTART_TRAIN = dict(max_steps=600, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=50,
                        eval_every=200, save_every=200, log_every=10)
# The drift table of the quickstart: every default variant, on few enough held-out tokens
# and calibration windows to take a few minutes on 2 cores.
QUICKSTART_DRIFT = dict(max_tokens=4096, calib_samples=64)


def cmd_train(args: argparse.Namespace) -> None:
    """Train a FANformer (from a preset, or resume a checkpoint) and save it to --out."""
    from fanformer.pipeline import train_run
    from fanformer.training import TrainConfig

    train_run(out=args.out, preset=args.preset, data=args.data, resume=args.resume, force=args.force,
              model_overrides=config_overrides(args, FANformerConfig),
              train_overrides=config_overrides(args, TrainConfig), tokenizer_path=args.tokenizer,
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
        config = FANformerConfig.from_name(target, **config_overrides(args, FANformerConfig))
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


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The whole story on the default corpus: train a small FANformer, export it to ONNX and GGUF,
    quantize it (bitsandbytes int8, RTN, GPTQ, AWQ), print the drift table and a sample from the
    best 4-bit variant."""
    from fanformer.checkpoint import check_output_dir
    from fanformer.cli.run import print_drift_table
    from fanformer.pipeline import train_run
    from fanformer.runtime import GenerationConfig, generate, load_backend
    from fanformer.runtime.drift_report import best_row
    from fanformer.runtime.drift_table import TableConfig, run_drift_table
    from fanformer.runtime.variants import VARIANTS

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


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = RUN[name].__doc__ + (f" It takes {QUICKSTART_TIME}." if name == "quickstart" else "")
    if name == "train":
        from fanformer.training import TrainConfig

        parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
        parser.add_argument("--data", nargs="+", help="files, folders (read recursively) or globs of .txt/.md/.py/.jsonl/.jsonl.gz/.jsonl.zst/.parquet "
                            "(default: the Python standard library's source on this machine)")
        parser.add_argument("--out", required=True, help="checkpoint directory to write")
        parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out where it stopped")
        parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
        parser.add_argument("--tokenizer", help="use this tokenizer.json (or checkpoint dir) instead of training one")
        parser.add_argument("--cache-dir", help="token cache (default $FANFORMER_CACHE or ~/.cache/fanformer)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        add_config_flags(parser, FANformerConfig, "model config (each flag overrides the preset)", show_defaults=False)
        add_config_flags(parser, TrainConfig, "training")
    elif name == "info":
        parser.add_argument("checkpoint", nargs="?", help="checkpoint directory")
        parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
        parser.add_argument("--json", action="store_true", help="print JSON")
        add_config_flags(parser, FANformerConfig, "model config (each flag overrides the preset)", show_defaults=False)
    elif name == "quickstart":
        parser.add_argument("--out", default=QUICKSTART_OUT, help=f"checkpoint directory (default {QUICKSTART_OUT})")
        parser.add_argument("--data", nargs="+", help="corpus (default: the Python standard library's source)")
        parser.add_argument("--max-steps", type=positive_int,
                            help=f"training steps (default {QUICKSTART_TRAIN['max_steps']})")
        parser.add_argument("--force", action="store_true", help="overwrite a previous quickstart run (checkpoint "
                                                                 "and <out>-drift)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


RUN = {"train": cmd_train, "info": cmd_info, "quickstart": cmd_quickstart}


def run(name: str, args: argparse.Namespace):
    return RUN[name](args)
