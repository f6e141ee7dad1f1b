"""Ctrl-C (SIGINT) or SIGTERM during `fanformer train` saves the last finished step, and
`--resume` from it gives the very weights of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fanformer.checkpoint import TRAINER_STATE_FILE, WEIGHTS_FILE
from fanformer.pipeline import train_run
from fanformer.training import METRICS_FILE

MODEL = dict(vocab_size=400, max_seq_len=64, dropout=0.1)
TRAIN = dict(max_steps=5000, batch_size=2, lr=3e-3, warmup_steps=3, eval_every=0, save_every=0, log_every=1)


def flags(options: dict) -> list[str]:
    return [part for key, value in options.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def logged_steps(out) -> int:
    path = out / METRICS_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_resumes_exactly(corpus, cache_dir, tmp_path, signum):
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "fanformer.cli", "train", "--preset", "tiny", "--data", str(corpus),
               "--out", str(interrupted), "--cache-dir", str(cache_dir), "--quiet", *flags(MODEL), *flags(TRAIN)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "FANFORMER_CACHE": str(cache_dir)})
    deadline = time.monotonic() + 120
    while logged_steps(interrupted) < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "--resume continues" in err

    state = json.loads((interrupted / TRAINER_STATE_FILE).read_text())
    stopped = state["step"]
    assert 3 <= stopped < TRAIN["max_steps"]
    assert [json.loads(line)["step"] for line in (interrupted / METRICS_FILE).read_text().splitlines()] == \
        list(range(1, stopped + 1))
    assert not list(tmp_path.glob(".interrupted.*"))  # no temporary folder left behind

    # Resume to a few steps past the interruption; the reference runs there without stopping.
    target = stopped + 3
    torch.manual_seed(4321)  # as a fresh process would be: only the restored RNG state may matter
    train_run(interrupted, data=[str(corpus)], resume=True, train_overrides=dict(stop_at=target),
              cache_dir=cache_dir, progress=False)
    reference = tmp_path / "reference"
    train_run(reference, data=[str(corpus)], model_overrides=MODEL, train_overrides=dict(TRAIN, stop_at=target),
              cache_dir=cache_dir, progress=False)
    resumed, straight = load_file(str(interrupted / WEIGHTS_FILE)), load_file(str(reference / WEIGHTS_FILE))
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
