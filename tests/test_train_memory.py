"""benchmarks/train_memory.py's prediction of the largest micro-batch under a budget."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_memory import GIB, largest_batch  # noqa: E402


def test_a_peak_that_grows_with_the_batch_is_extended_to_the_budget():
    # 10 GiB fixed + 1.5 GiB a sequence: 22 GiB holds 8 sequences (22.0), not 9 (23.5).
    points = {1: {"peak": 11.5 * GIB}, 2: {"peak": 13 * GIB}, 4: {"peak": 99 * GIB}}  # only the two smallest count
    fits, fixed, per_sequence = largest_batch(points, 22 * GIB)
    assert (fits, fixed, per_sequence) == ("8", pytest.approx(10 * GIB), pytest.approx(1.5 * GIB))


def test_a_peak_that_does_not_grow_gives_no_line():
    """paper-1b on the CPU, 2026-12-05: 17.37 GiB at batch 1, 15.49 at batch 2."""
    points = {1: {"peak": 17.37 * GIB}, 2: {"peak": 15.49 * GIB}}
    assert largest_batch(points, 22 * GIB) == (">= 2", None, None)
    assert largest_batch({1: {"peak": 23 * GIB}, 2: {"peak": 23 * GIB}}, 22 * GIB) == ("< 1", None, None)


def test_one_point_or_none():
    assert largest_batch({2: {"peak": 5 * GIB}}, 22 * GIB) == (">= 2", None, None)
    assert largest_batch({1: {"over": "exit 1"}}, 22 * GIB) == ("0", None, None)
