"""Running fuzz cases: copy a seed folder, damage its target file with a seeded mutator, run
`fanformer generate` on it in a capped child of the fork server (server.py), and record the
outcome. A case is reproducible from (kind, case seed): the same seed gives the same bytes.

Outcomes: ok (it loaded and generated), error (one clean FANformerError line, exit 2), and
the bad ones the suite exists to find: crash (a signal), hang (past the time limit),
over-allocation (MemoryError, or an allocation failure reported through any library), and
foreign (any other exception, or a traceback on stderr).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fuzzing.mutate import mutate
from fuzzing.seeds import KINDS, build_seeds

OUTCOMES = ("ok", "error", "crash", "hang", "over-allocation", "foreign")
BAD = ("crash", "hang", "over-allocation", "foreign")
PROMPT = ("--prompt", "def add", "--max-new-tokens", "3", "--seed", "0")


@dataclass
class Case:
    kind: str
    seed: int
    mutation: str = ""
    outcome: str = ""
    seconds: float = 0.0
    log: str = ""  # the child's stdout and stderr, kept for bad outcomes


class Runner:
    """The seeds, the fork server, and a scratch folder for the case being run."""

    def __init__(self, root: Path, timeout: float = 30.0, budget: int = 2 << 30, keep: Path | None = None):
        self.root, self.timeout, self.budget, self.keep = root, timeout, budget, keep
        self.seeds = build_seeds(root / "seeds")
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("server.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       cwd=root, env=_server_env(), preexec_fn=_end_with_parent)
        ready = self.server.stdout.readline()
        if not ready:
            raise RuntimeError("the fuzz server did not start")

    def run(self, kind_name: str, seed: int) -> Case:
        kind, case = KINDS[kind_name], Case(kind_name, seed)
        folder = self.root / "case"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.seeds / kind.seed, folder)
        target = folder / kind.target
        rng = random.Random(f"{kind_name}:{seed}")
        data, case.mutation = mutate(kind.target, target.read_bytes(), rng)
        target.write_bytes(data)
        path = folder / kind.target if kind.target.endswith(".gguf") else folder
        extra = ("--engine", "ggml" if seed % 2 else "torch", "--threads", "1") if kind.target.endswith(".gguf") else ()
        argv = ["generate", str(path), *PROMPT, *kind.argv, *extra]
        log = self.root / "case.log"
        request = {"argv": argv, "log": str(log), "timeout": self.timeout, "budget": self.budget}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = json.loads(self.server.stdout.readline())
        case.outcome, case.seconds = answer["outcome"], answer["seconds"]
        if case.outcome in BAD:
            case.log = (log.read_text(errors="replace") if log.is_file() else "")[-3000:] + \
                (f"\n[signal {answer['signal']}]" if "signal" in answer else "")
            if self.keep is not None:  # the damaged folder, to reproduce the case by hand
                shutil.copytree(folder, self.keep / f"{kind_name}-{seed}", dirs_exist_ok=True)
        return case

    def close(self, interrupted: bool = False) -> None:
        """Let the server finish (it exits at the end of its input), or end it and its case now."""
        if interrupted:
            self.server.terminate()
        else:
            self.server.stdin.close()
        self.server.wait(timeout=30)


def _end_with_parent() -> None:
    """In the server, before exec: SIGTERM when the runner dies, however it dies (Linux's
    PR_SET_PDEATHSIG), so a killed campaign leaves no server running cases."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _server_env() -> dict:
    import os

    # One thread everywhere: the cases are tiny, and the suite shares the machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def campaign(runner: Runner, kinds: Iterable[str], cases: int, first_seed: int = 0,
             on_case: Callable[[Case], None] | None = None) -> list[Case]:
    """`cases` cases per kind, seeds first_seed.., kinds interleaved so a cut-short run still
    covers each kind."""
    results = []
    for seed in range(first_seed, first_seed + cases):
        for kind in kinds:
            case = runner.run(kind, seed)
            results.append(case)
            if on_case is not None:
                on_case(case)
    return results


def table(results: list[Case]) -> str:
    """A Markdown table: cases per kind and outcome."""
    kinds = list(dict.fromkeys(case.kind for case in results))
    rows = ["| file kind | cases | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for kind in kinds + ["all"]:
        mine = [c for c in results if kind in ("all", c.kind)]
        counts = [sum(c.outcome == o for c in mine) for o in OUTCOMES]
        name = f"**{kind}**" if kind == "all" else kind
        rows.append(f"| {name} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(rows)
