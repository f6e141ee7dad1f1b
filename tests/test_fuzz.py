"""The fuzz suite's fast slice (benchmarks/fuzz.py runs the long campaign): mutated files of
every kind the project reads, each through `fanformer generate` in a capped child; any
crash, hang, over-allocation or foreign exception fails. And the harness itself: each bad
outcome is recognised as such, so a clean table means something."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzzing.mutate import mutate  # noqa: E402
from fuzzing.run import BAD, Runner, campaign, table  # noqa: E402
from fuzzing.seeds import KINDS  # noqa: E402
from fuzzing.server import run_case  # noqa: E402

SLICE = 30  # cases per kind: ~300 cases, under a minute after the seeds (~25 s)


def _exits_2():
    print("fanformer generate: error: a clean one-line error", file=sys.stderr)
    return 2


def _raises():
    return {}["missing"]


def _allocates():
    return len(bytearray(64 << 30))


def _segfaults():
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.parametrize("call, outcome", [(lambda: 0, "ok"), (_exits_2, "error"), (_raises, "foreign"),
                                           (_allocates, "over-allocation"), (_segfaults, "crash"),
                                           (lambda: time.sleep(60), "hang")])
def test_each_outcome_is_recognised(tmp_path, call, outcome):
    found = run_case(call, str(tmp_path / "case.log"), timeout=3, budget=1 << 30)
    assert found["outcome"] == outcome, (tmp_path / "case.log").read_text()


def test_mutations_are_seeded_and_change_the_file(tmp_path):
    import random

    data = bytes(range(256)) * 64
    first = mutate("model.gguf", data, random.Random("gguf:1"))
    assert first == mutate("model.gguf", data, random.Random("gguf:1"))
    assert first[0] != data


@pytest.mark.slow
def test_fuzz_slice(tmp_path):
    runner = Runner(tmp_path, timeout=30)
    try:
        results = campaign(runner, list(KINDS), SLICE)
    finally:
        runner.close()
    bad = [f"{c.outcome}: {c.kind} seed {c.seed} ({c.mutation})\n{c.log}" for c in results if c.outcome in BAD]
    assert not bad, table(results) + "\n\n" + "\n\n".join(bad)
    # The slice reaches both sides: files that still load and files refused cleanly.
    assert {c.outcome for c in results} == {"ok", "error"}
