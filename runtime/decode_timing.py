"""Decode speed and peak memory of one artifact, measured in a fresh Python process so that
the peak (Linux's VmHWM) is that artifact's own, not the calling process's: greedy batch-1
decode steps through the backend interface, the fastest of REPEATS runs after a warmup.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fanformer.errors import FANformerError
from fanformer.runtime.backend import Backend

PROMPT_LEN, DECODE_STEPS, REPEATS = 64, 32, 3


def time_decode_in_child(path: Path, options: dict, steps: int, threads: int) -> dict:
    """Run `decode_child` in a new interpreter on this artifact; its JSON result."""
    spec = {"path": str(path), "options": options, "steps": steps, "threads": threads}
    done = subprocess.run([sys.executable, "-c", "from fanformer.runtime.decode_timing import decode_child; decode_child()",
                           json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise FANformerError(f"the timing process exited with {done.returncode}: {lines[-1] if lines else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (Linux VmHWM; ru_maxrss would carry the parent's
    peak over the exec). None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_tokens_per_s(backend: Backend, steps: int, repeats: int = REPEATS) -> float:
    """Greedy batch-1 decode after a PROMPT_LEN prompt of seeded random tokens: steps per
    second of the fastest of `repeats` runs, after one warmup run."""
    info = backend.info
    length = max(1, min(PROMPT_LEN, info.max_seq_len - steps - 1))
    prompt = torch.randint(0, info.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        cache = backend.new_cache(1)
        mask = torch.ones_like(prompt)
        token = backend.prefill(cache, prompt, mask, last_only=True)[:, -1].argmax(-1, keepdim=True).cpu()
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            token = backend.decode(cache, token, mask)[:, -1].argmax(-1, keepdim=True).cpu()
        return time.perf_counter() - start

    run()
    return steps / min(run() for _ in range(repeats))


def decode_child() -> None:
    """Entry point of the timing process: argv[1] is the JSON spec; prints one JSON line."""
    from fanformer.runtime import load_backend

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    try:
        backend = load_backend(spec["path"], **spec["options"])
        speed = decode_tokens_per_s(backend, spec["steps"])
    except FANformerError as err:
        sys.exit(f"error: {err}")
    print(json.dumps({"decode_tokens_per_s": speed, "peak_rss_bytes": peak_rss_bytes()}))
