"""The fork server: a fresh interpreter that imports the CLI and every backend once, then
forks one child per case, so a case costs a fork and a model load, not an interpreter and a
torch import. Started by `Runner` (benchmarks/fuzzing/run.py); it reads one JSON request a
line on stdin and answers one JSON line on stdout.

Fresh on purpose: the parent built the seed files with torch, and a process that has run
OpenMP or onnxruntime threads cannot fork safely; this one only imports.

A child caps its address space (RLIMIT_AS: what it holds at the fork plus the case's
budget), sends its output to the case's log, runs `fanformer generate`, and exits 0 (ok),
2 (the CLI's one-line error), 3 (any other exception: foreign) or 4 (MemoryError). The
server kills it at the time limit and classifies what it sees.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import re
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

OK, ERROR, FOREIGN, OVER_ALLOCATION = 0, 2, 3, 4
# Allocation failures reported through some library's own error (C++ std::bad_alloc, torch's
# allocator, glibc): a missed bound, not a clean error, even when wrapped in one.
ALLOCATION = re.compile(r"bad_alloc|can't allocate memory|Cannot allocate memory|out of memory|"
                        r"failed to allocate|MemoryError|std::length_error", re.IGNORECASE)


def _imports() -> None:
    import torch

    torch.set_num_threads(1)
    import fanformer.cli.run  # noqa: F401  (the subcommand's module)
    from fanformer.runtime.backend import backends

    backends()  # every *_backend module, onnxruntime, onnxruntime-genai
    from fanformer.runtime.gguf_backend import ggml_missing

    ggml_missing()  # loads libggml
    import fanformer.quant.bnb  # noqa: F401  (bitsandbytes: seconds to import)
    from fanformer.config import FANformerConfig
    from fanformer.model import FANformer

    with torch.device("meta"):  # the first meta-device init imports torch._refs: seconds, once
        FANformer(FANformerConfig())


def _child(call, log: str, budget: int) -> None:
    """In the forked child: `call()` (the CLI's main: 0 or 2), then exit; never returns."""
    code = FOREIGN
    try:
        faulthandler.disable()  # a crash is an outcome here, not the parent's (pytest's) report
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with open("/proc/self/status") as f:
            held = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (held + budget, held + budget))
        code = call()
        code = OK if code == 0 else ERROR if code == 2 else FOREIGN
    except MemoryError:
        traceback.print_exc()
        code = OVER_ALLOCATION
    except BaseException:  # everything else that escapes the CLI is what the suite looks for
        traceback.print_exc()
        code = FOREIGN
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_running = None  # the case's child, ended with the server


def _stop(signum, frame):
    """SIGTERM, or the runner gone: end the running case too, then the server."""
    if _running is not None:
        try:
            os.kill(_running, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)


def run_case(call, log: str, timeout: float, budget: int) -> dict:
    """Run `call()` in a forked child capped at `budget` bytes beyond what it holds and
    `timeout` seconds; {"outcome": one of run.OUTCOMES, "seconds", and "signal" if one
    ended it}."""
    global _running
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(call, log, budget)
    _running = pid
    status = None
    while time.monotonic() - start < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return {"outcome": "hang", "seconds": round(time.monotonic() - start, 2)}
    seconds = round(time.monotonic() - start, 2)
    text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return {"outcome": "over-allocation" if ALLOCATION.search(text) else "crash", "signal": sig, "seconds": seconds}
    code = os.WEXITSTATUS(status)
    outcome = {OK: "ok", ERROR: "error", OVER_ALLOCATION: "over-allocation"}.get(code, "foreign")
    if outcome == "error" and ALLOCATION.search(text):
        outcome = "over-allocation"
    if outcome == "error" and "Traceback" in text:
        outcome = "foreign"
    return {"outcome": outcome, "seconds": seconds}


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _imports()
    from fanformer.cli import main as cli_main

    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            answer = run_case(functools.partial(cli_main, request["argv"]), request["log"], request["timeout"],
                              request["budget"])
            print(json.dumps(answer), flush=True)
    except BrokenPipeError:  # the runner is gone
        _stop(signal.SIGPIPE, None)


if __name__ == "__main__":
    main()
