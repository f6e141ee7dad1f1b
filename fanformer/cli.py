"""The `fanformer` command line: a thin layer of subcommands over the library.

Each subcommand is a plain function taking parsed arguments; config fields become
flags automatically (`--n-layers 4`, `--p 0`, `--norm pre`, ...). A `FANformerError`
is printed as one line and exits with status 2; anything else is a bug and keeps its
traceback.
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


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Train a small FANformer on the default corpus (a few minutes on 2 CPU cores) and sample it."""
    from fanformer.checkpoint import load_model
    from fanformer.pipeline import train_run
    from fanformer.sample import sample_text
    from fanformer.tokenizer import load_tokenizer

    train_overrides = dict(QUICKSTART_TRAIN)
    if args.max_steps:
        train_overrides["max_steps"] = args.max_steps
    train_run(out=args.out, preset="tiny", data=args.data, resume=False, force=args.force,
              model_overrides=dict(QUICKSTART_MODEL), train_overrides=train_overrides,
              progress=not args.quiet)
    model, tokenizer = load_model(args.out), load_tokenizer(args.out)
    print(f"\ncheckpoint: {args.out}\nsample:\n")
    print(sample_text(model, tokenizer, "def ", max_new_tokens=120, temperature=0.7, top_k=50))


COMMANDS = {"train": cmd_train, "info": cmd_info, "quickstart": cmd_quickstart}


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

    quick = sub.add_parser("quickstart", help=cmd_quickstart.__doc__, description=cmd_quickstart.__doc__)
    quick.add_argument("--out", default=QUICKSTART_OUT, help=f"checkpoint directory (default {QUICKSTART_OUT})")
    quick.add_argument("--data", nargs="+", help="corpus (default: the Python standard library's source)")
    quick.add_argument("--max-steps", type=int, default=0, help=f"training steps (default {QUICKSTART_TRAIN['max_steps']})")
    quick.add_argument("--force", action="store_true", help="overwrite a previous quickstart run")
    quick.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except FANformerError as err:
        print(f"fanformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fanformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
