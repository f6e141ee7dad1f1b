"""The README runs as written: every shell and Python block, in order, in one fresh folder.

Each block runs with the same commands and file names as the README, made small by the
rules below (fewer steps, tokens and calibration windows, one layer, the test corpus as
`corpus/`), so the whole README takes minutes. `fanformer` commands run in-process through
`fanformer.cli.main`; benchmark scripts and torchrun run as the README gives them. A block
that cannot run here carries a `<!-- readme-test: skip, REASON -->` line just above it.

    python -m pytest -m readme        # this test alone
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip, (.+?) -->")

# What keeps each command small: regex -> replacement on the command line ...
SHRINK = [
    (r"(benchmarks/quantize\.py.*)--preset [\w-]+", r"\1--preset tiny"),
    (r"^(fanformer|torchrun)(.*)--preset seed-92m", r"\1\2--preset seed-92m --n-layers 1 --vocab-size 2048"),
    (r"^(fanformer|torchrun)(.*)--preset (small|paper-\w+)", r"\1\2--preset \3 --n-layers 1"),
    (r"--seq-len \d+", "--seq-len 64"),
    (r"--batch-size 16", "--batch-size 4"),
    (r"--max-steps \d+", "--max-steps 3"),
    (r"--steps \d+", "--steps 3"),
    (r"--max-tokens \d+", "--max-tokens 300"),
    (r"--calib-samples \d+", "--calib-samples 4"),
    (r"--calib-seq-len \d+", "--calib-seq-len 32"),
    (r"--chunks \d+", "--chunks 4"),
    (r"--data corpus/", "--data corpus"),
    (r"(benchmarks/fuzz\.py.*)--cases \d+", r"\1--cases 1"),
    (r"--requests \d+", "--requests 1"),
    (r"--repeat \d+", "--repeat 1"),
]
# ... and flags added where a command leaves them out (None: a flag without a value).
ADD = {
    "train": {"--max-steps": "3", "--data": "corpus", "--eval-batches": "1"},
    "quickstart": {"--max-steps": "3", "--data": "corpus"},
    "eval": {"--max-tokens": "300", "--data": "corpus"},
    "drift": {"--max-tokens": "300", "--data": "corpus", "--variants": "gguf-q8_0", "--no-speed": None,
              "--calib-samples": "4"},
    "quantize": {},
    "imatrix": {"--calib-data": "corpus"},
    "experiment": {"--steps": "3", "--seeds": "1", "--jobs": "1"},
    "benchmarks/quant_drift.py": {"--max-tokens": "300", "--calib-samples": "4", "--calib-seq-len": "32"},
    "benchmarks/quantize.py": {"--calib-samples": "4", "--calib-seq-len": "32"},
    "benchmarks/serve_load.py": {"--max-tokens": "8", "--clients": "2"},
}
CALIBRATED = {"--calib-data": "corpus", "--calib-samples": "4", "--calib-seq-len": "32"}
PYTHON_SHRINK = [
    ("eval_tokens(backend.tokenizer)", "eval_tokens(backend.tokenizer, ['corpus'], max_tokens=300)"),
    ("data=None, samples=128, seq_len=256", "data=['corpus'], samples=4, seq_len=32"),
]
# The quickstart's drift table: two variants whose files the README uses later.
QUICKSTART_DRIFT = dict(variants=("gguf-q8_0", "gguf-q4_0"), max_tokens=300, speed=False)


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason) of every fenced bash/python block, in order."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"^( *)```(bash|python)\n(.*?)^ *```", text, re.S | re.M):
        before = text[:match.start()].rstrip().splitlines()
        skip = SKIP.search(before[-1]) if before else None
        code = "\n".join(line[len(match[1]):] for line in match[3].splitlines())
        found.append((text[:match.start()].count("\n") + 1, match[2], code, skip[1] if skip else None))
    return found


def commands(code: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments dropped, `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    out = []
    for words in filter(None, lines):
        parts, current = [], []
        for word in words:
            if word == "&&":
                parts.append(current)
                current = []
            else:
                current.append(word)
        out += [shlex.join(part) for part in parts + [current] if part]
    return out


def shrink(command: str) -> list[str]:
    for pattern, replacement in SHRINK:
        command = re.sub(pattern, replacement, command)
    argv = shlex.split(command)
    key = argv[1] if argv[0] == "fanformer" else argv[1] if argv[0] == "python" else None
    if argv[0] == "torchrun":
        key = "train"
    added = dict(ADD.get(key, {}))
    if key == "quantize" and any(m in argv for m in ("gptq", "awq")):
        added = CALIBRATED
    if key == "export" and "--gptq" in argv:
        added = {"--calib-data": "corpus", "--calib-samples": "4"}
    if key == "train" and "--resume" in argv:
        added["--max-steps"] = "5"  # on from the 3 steps it stopped at
    for flag, value in added.items():
        if flag not in argv:
            argv += [flag] + ([value] if value is not None else [])
    if "--resume" in argv and "--max-steps" in argv:
        argv[argv.index("--max-steps") + 1] = "5"
    return argv


def run_shell(command: str, workdir: Path, monkeypatch) -> None:
    from fanformer.cli import main
    import fanformer.cli.train as train_commands

    argv = shrink(command)
    while re.match(r"^\w+=", argv[0]):  # VAR=value before a command: its environment
        argv = argv[1:]
    if argv[0] in ("python3", ".", "pip") or argv[:3] == ["python", "-m", "pytest"]:
        return  # set-up and the test suite itself (CI's .ci/run is the README's second command)
    if argv[:2] == ["fanformer", "serve"]:
        run_server(argv, workdir)
        return
    if argv[0] == "fanformer":
        monkeypatch.setattr(train_commands, "QUICKSTART_DRIFT", QUICKSTART_DRIFT)
        monkeypatch.setattr(sys, "stdin", io.StringIO("def \n"))  # the interactive `generate`
        with redirect_stdout(io.StringIO()):
            status = main(argv[1:])
        verdicts = ("drift", "quickstart")  # exit 1 there is a verdict (a row over budget), not an error
        assert status == 0 or (status == 1 and argv[1] in verdicts), f"{command!r} exited {status}"
        return
    if argv[0] == "python" and argv[1].startswith("benchmarks/"):
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        raise AssertionError(f"the README test does not know how to run {command!r}; mark its block")
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_server(argv: list[str], workdir: Path) -> None:
    """`fanformer serve` runs until stopped: start it on a free port (another job may hold
    the README's), check that it answers a completion, stop it."""
    port = str(free_port())
    argv = argv[:argv.index("--port") + 1] + [port] + argv[argv.index("--port") + 2:] if "--port" in argv \
        else argv + ["--port", port]
    process = subprocess.Popen([sys.executable, "-m", "fanformer.cli", *argv[1:]], cwd=workdir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(f"{shlex.join(argv)!r} exited {process.returncode}:\n{process.stderr.read()[-3000:]}")
            try:
                model = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=5).read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"{shlex.join(argv)!r} did not answer within 60 s")
        body = json.dumps({"model": model, "prompt": "def ", "max_tokens": 8}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]["text"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_python(code: str) -> None:
    for old, new in PYTHON_SHRINK:
        code = code.replace(old, new)
    # The serving example's port 8080 (the only one in the README) may be taken here: a free one.
    code = code.replace("8080", str(free_port()))
    with redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


@pytest.mark.readme
@pytest.mark.slow
def test_every_block_runs_in_order(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(corpus, tmp_path / "corpus")
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "drift_budget.json", tmp_path / "tests")
    ran, skipped = 0, []
    for line, language, code, skip in blocks():
        if skip:
            skipped.append(f"README.md:{line}: {skip}")
            continue
        try:
            if language == "python":
                run_python(code)
            else:
                for command in commands(code):
                    run_shell(command, tmp_path, monkeypatch)
        except BaseException as err:
            raise AssertionError(f"README.md:{line}: {type(err).__name__}: {err}") from err
        ran += 1
    assert ran >= 15
    print("\n".join(["skipped:", *skipped]))


def test_skip_reasons_are_only_hardware_and_external_tools():
    reasons = [skip for *_, skip in blocks() if skip]
    assert all(re.match(r"needs (a CUDA GPU|llama\.cpp)", reason) for reason in reasons), reasons


def test_the_quickstart_time_is_stated_once():
    from fanformer.cli.train import QUICKSTART_TIME

    assert README.read_text().replace("\n", " ").count(QUICKSTART_TIME) == 1
