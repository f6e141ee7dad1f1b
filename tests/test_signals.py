"""SIGINT and SIGTERM end every command that starts worker processes together with its
workers, and leave no half-written output: sent mid-run to `fanformer experiment modular`
(multiprocessing workers), `fanformer drift` (its decode-timing child) and `fanformer
train` while it builds the token cache. Survivors are looked for in /proc."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer

SIGNALS = [signal.SIGINT, signal.SIGTERM]


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of `pid`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = _cmdline(child)
                frontier.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def interrupt(command: list[str], signum: int, started, timeout: float = 240) -> tuple[dict[int, str], str]:
    """Start the CLI, wait until `started(children)` holds, send `signum`, and check that
    it exits as interrupted and that none of the processes it started outlives it."""
    # A shell's background job (`cmd &`) inherits SIGINT ignored, and so would the CLI; a
    # user's terminal delivers it: restore the default before the CLI starts.
    cli = subprocess.Popen([sys.executable, "-m", "fanformer.cli", *command], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def ready():
            if cli.poll() is not None:
                pytest.fail(f"the command ended before it was interrupted: {cli.communicate()[1]}")
            found = children(cli.pid)
            return (found,) if started(found) else None

        (seen,) = wait_for(ready, timeout, "the command to reach the point where it is interrupted")
        cli.send_signal(signum)
        _, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"fanformer {command[0]}: interrupted", err
    deadline = time.monotonic() + 10  # reparented children are reaped by init, not at once
    while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = {pid: cmd for pid, cmd in seen.items() if alive(pid)}
    assert not survivors, survivors
    return seen, err


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name] if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS)
def test_experiment_workers_end_with_the_command(tmp_path, signum):
    out = tmp_path / "modular"
    command = ["experiment", "modular", "--task", "add_mod", "--out", str(out), "--quiet", "--d-model", "32",
               "--n-heads", "2", "--ffn-dim", "64", "--steps", "100000", "--batch-size", "64", "--seeds", "2",
               "--jobs", "2"]
    workers = lambda c: sum("multiprocessing" in cmd and "resource_tracker" not in cmd for cmd in c.values()) >= 2
    interrupt(command, signum, workers)
    time.sleep(1)  # give a survivor a chance to write
    assert not temporaries(out)
    assert not (out / "results.json").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, 400)
    config = FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size())
    return save_checkpoint(tmp_path_factory.mktemp("signals") / "ckpt", FANformer(config), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS)
def test_drift_timing_child_ends_with_the_command(tmp_path, checkpoint, corpus, cache_dir, signum):
    out = tmp_path / "drift"
    command = ["drift", str(checkpoint), "--data", str(corpus), "--variants", "pytorch-fp16", "--max-tokens", "200",
               "--quiet", "--out", str(out), "--cache-dir", str(cache_dir)]
    interrupt(command, signum, lambda c: any("decode_child" in cmd for cmd in c.values()))
    assert not temporaries(out)
    assert not (out / "drift.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS)
def test_data_preparation_leaves_no_partial_cache(tmp_path, checkpoint, signum):
    """The token cache is built in a temporary folder: interrupted, it is removed."""
    corpus, cache = tmp_path / "corpus.jsonl", tmp_path / "cache"
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * 40 for i in range(20_000)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    command = ["train", "--preset", "tiny", "--data", str(corpus), "--tokenizer", str(checkpoint), "--out",
               str(tmp_path / "out"), "--cache-dir", str(cache), "--quiet", "--vocab-size", "400"]
    building = lambda c: list(cache.glob(".tmp-*")) if cache.exists() else []
    interrupt(command, signum, lambda c: building(c))
    assert not temporaries(cache) and not list(cache.iterdir())
    assert not (tmp_path / "out").exists()
