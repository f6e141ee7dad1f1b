"""`fanformer experiment` and `fanformer analyze`: the seeds' Fourier experiments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fanformer.cli.flags import add_config_flags, config_overrides, positive_int


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run an experiment: `modular` is the paper's leave-square-out test, FANformer against a Transformer."""
    from fanformer.modular import RESULTS_FILE, TASKS, ExperimentConfig, format_results, run_experiment

    tasks = tuple(TASKS) if args.task == "both" else (args.task,)
    config = ExperimentConfig(tasks=tasks, **config_overrides(args, ExperimentConfig))
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


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = RUN[name].__doc__
    if name == "experiment":
        from fanformer.modular import ExperimentConfig

        which = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
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
        add_config_flags(modular, ExperimentConfig, "experiment")
    else:
        what = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
        fourier = what.add_parser("fourier", help="Fourier spectrum and dominant periods of number tokens",
                                  description="DFT over the number axis of the embeddings (and hidden states) of the "
                                              "tokens '0'..'N'; prints the dominant periods and plots the spectrum.")
        fourier.add_argument("checkpoint", help="checkpoint directory whose tokenizer has the number tokens")
        fourier.add_argument("--max-number", type=positive_int, help="analyse 0..N (default: the longest run of number "
                                                            "tokens from 0)")
        fourier.add_argument("--layers", action="store_true", help="also the hidden state after every block")
        fourier.add_argument("--top", type=positive_int, default=5, help="dominant periods to report (default 5)")
        fourier.add_argument("--out", help="folder for fourier.png and fourier.json (default <checkpoint>-fourier)")
        fourier.add_argument("--json", action="store_true", help="print the result as JSON")


RUN = {"experiment": cmd_experiment, "analyze": cmd_analyze}


def run(name: str, args: argparse.Namespace):
    return RUN[name](args)
