"""The `fanformer` command line: a thin layer of subcommands over the library, and the
top layer of the package (it may import everything; nothing imports it).

Each subcommand is a plain function taking parsed arguments, in the module named in
`COMMANDS`; config fields and the registries' options become flags automatically
(fanformer/cli/flags.py). Only the subcommand being run is imported and given its flags,
so `fanformer --help` loads no library. A `FANformerError` is printed as one line and exits
with status 2; anything else is a bug and keeps its traceback. A subcommand that gives a
verdict returns its exit status: `drift` (and `quickstart`, which ends with the drift
table) exit 1 when a variant is over its drift budget or failed to build or run, so a
script can tell a bad model (1) from a bad command line (2).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module holding add_arguments(name, parser) and run(name, args), one-line help)
COMMANDS = {
    "train": ("fanformer.cli.train", "train a FANformer (from a preset, or resume a checkpoint) and save it"),
    "info": ("fanformer.cli.train", "print the config and exact parameter count of a preset or checkpoint"),
    "export": ("fanformer.cli.convert", "export a checkpoint to ONNX or GGUF"),
    "quantize": ("fanformer.cli.convert", "quantize a checkpoint: RTN, GPTQ, AWQ, bitsandbytes int8 or nf4"),
    "imatrix": ("fanformer.cli.convert", "compute an importance matrix (llama.cpp's imatrix GGUF) for GGUF quantization"),
    "generate": ("fanformer.cli.run", "generate text from any model form, with a KV cache"),
    "eval": ("fanformer.cli.run", "perplexity on held-out text, or drift against a reference"),
    "drift": ("fanformer.cli.run", "the drift table: every variant against the FP16 reference"),
    "serve": ("fanformer.cli.serve", "serve a model over HTTP: OpenAI's completions API, batched decoding"),
    "quickstart": ("fanformer.cli.train", "the whole story: train, drift table, a sample"),
    "experiment": ("fanformer.cli.experiments", "run an experiment (modular: leave-square-out)"),
    "analyze": ("fanformer.cli.experiments", "analyse a checkpoint (fourier: spectra of number tokens)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of `command` only (none: just the list of commands)."""
    parser = argparse.ArgumentParser(prog="fanformer",
                                     description="Train FANformer language models and take them to the edge.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_arguments(name, sub.add_parser(name, help=summary))
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # Our packages report progress at INFO; libraries (exporters, optimizers) only warnings.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("fanformer").setLevel(logging.INFO)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    args.argv = argv  # messages name flags in the order they were given
    from fanformer.errors import FANformerError
    from fanformer.processes import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # `finally` blocks run: no orphaned workers, no half-written output
            status = importlib.import_module(COMMANDS[args.command][0]).run(args.command, args)
    except FANformerError as err:
        print(f"fanformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fanformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0  # None from the subcommands without a verdict


if __name__ == "__main__":
    sys.exit(main())
