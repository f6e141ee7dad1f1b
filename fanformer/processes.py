"""Ending worker processes with the command that started them.

SIGTERM's default action kills a process on the spot: no `finally` runs, so a temporary
folder is left half-written and child processes (an experiment's workers, the drift
table's timing process) are orphaned, each still burning a core. The CLI therefore turns
SIGTERM into KeyboardInterrupt, as Ctrl-C is, and every place that starts processes ends
them on the way out. Pool workers ignore SIGINT (Ctrl-C reaches the whole process group;
the parent decides) and on SIGTERM unwind the task they run, so its atomic writers clean up,
then exit.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

_busy = False  # in a pool worker: whether a task is running (SIGTERM unwinds it) or not (exit now)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt in the main thread (a no-op in
    other threads, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_sigterm(signum, frame):
    if _busy:
        raise KeyboardInterrupt("signal SIGTERM")
    os._exit(128 + signum)  # idle, waiting for work: nothing to clean up


def worker_signals() -> None:
    """A pool worker's initializer (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def in_worker(task: Callable, *args):
    """Run `task(*args)` in a pool worker started with `worker_signals`. On SIGTERM the task
    unwinds (its `finally` blocks run), then the worker exits instead of taking more work."""
    global _busy
    _busy = True
    try:
        return task(*args)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGTERM)
    finally:
        _busy = False


def terminate_pool(pool: ProcessPoolExecutor, grace: float = 30.0) -> None:
    """SIGTERM every worker of `pool`, SIGKILL any still alive after `grace` seconds, and
    drop the queued work. `ProcessPoolExecutor.shutdown` alone waits for the running work
    items to finish, which for a training run is minutes."""
    # The executor exposes its processes only as a private attribute before Python 3.14's
    # terminate_workers(); without it, shutdown below still cancels the queue.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace)
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=True, cancel_futures=True)
