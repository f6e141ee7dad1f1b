"""The fuzz campaign: `--cases N` mutated files of every kind the project reads, each loaded by
`fanformer generate` (three tokens) in a child process with a memory cap and a time limit,
and a table of outcomes per file kind. Exit status 1 if any case crashed, hung,
over-allocated or raised a foreign exception; their damaged folders are kept under --keep.

    python benchmarks/fuzz.py --cases 500

A case is (kind, seed): `--kinds gguf --first-seed 17 --cases 1` reruns one. The fast slice
of the same cases runs in CI (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from fanformer.processes import sigterm_as_interrupt

sys.path.insert(0, str(Path(__file__).parent))
from fuzzing.run import BAD, Runner, campaign, table  # noqa: E402
from fuzzing.seeds import KINDS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=50, help="cases per file kind")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a case may run")
    parser.add_argument("--memory", type=float, default=2.0, help="GiB a case may allocate beyond the imports")
    parser.add_argument("--keep", type=Path, help="folder to keep the damaged files of bad cases in")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fanformer-fuzz-"))
    start = time.monotonic()
    bar = tqdm(total=args.cases * len(args.kinds), unit="case")
    bad, runner = [], None

    def on_case(case) -> None:
        bar.update()
        if case.outcome in BAD:
            bad.append(case)
            bar.write(f"{case.outcome}: {case.kind} seed {case.seed} ({case.mutation})\n{case.log}")

    try:
        with sigterm_as_interrupt():  # on Ctrl-C or SIGTERM the server and its running case end too
            runner = Runner(work, timeout=args.timeout, budget=int(args.memory * 2**30), keep=args.keep)
            results = campaign(runner, args.kinds, args.cases, args.first_seed, on_case)
    except KeyboardInterrupt:
        if runner is not None:
            runner.close(interrupted=True)
        print(f"\ninterrupted after {bar.n} cases", file=sys.stderr)
        return 130
    finally:
        bar.close()
    runner.close()
    print(f"\n{len(results)} cases in {time.monotonic() - start:.0f} s "
          f"(python benchmarks/fuzz.py --cases {args.cases}{' --first-seed %d' % args.first_seed if args.first_seed else ''})\n")
    print(table(results))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
