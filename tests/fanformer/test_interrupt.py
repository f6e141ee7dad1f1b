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


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(corpus, cache_dir, tmp_path):
    """SIGTERM to rank 1 alone of a 2-process run (gloo): the ranks agree on stopping at the
    step's end (an all-reduce of the flag), rank 0 saves that step and both exit 130. Were
    rank 0 not told, it would go on alone and fail in DDP's next gradient all-reduce."""
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", FANFORMER_CACHE=str(cache_dir))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fanformer.cli", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out),
               "--cache-dir", str(cache_dir), "--quiet", *flags(MODEL), *flags(TRAIN)]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while logged_steps(out) < 3 and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(pid) for pid in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()]
    rank_1 = next(pid for pid in workers if "RANK=1" in open(f"/proc/{pid}/environ").read().split("\0"))
    os.kill(rank_1, signal.SIGTERM)
    _, err = agent.communicate(timeout=180)
    stopped = json.loads((out / TRAINER_STATE_FILE).read_text())["step"]
    assert f"stopped after step {stopped}" in err, err[-3000:]
    assert "Traceback" not in err.split("stopped after step")[0], err[-3000:]
    assert 3 <= stopped < TRAIN["max_steps"]
    assert [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()] == \
        list(range(1, stopped + 1))
