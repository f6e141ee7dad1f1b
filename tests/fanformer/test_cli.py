"""Tests for fanformer.cli: every mistake a user can make exits 2 with one line on
stderr, no traceback, and nothing half-written; `info` reports exact sizes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fanformer.checkpoint import (
    CONFIG_FILE,
    TRAINER_STATE_FILE,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    load_model,
)
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters

CONSOLE_SCRIPT = Path(sys.executable).parent / "fanformer"
TINY = ["--vocab-size", "400", "--max-seq-len", "64"]


def train_args(corpus, out, *extra) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(out), "--quiet", *TINY,
            "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1", *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A real 2-step checkpoint with training state; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    assert main(train_args(corpus, out)) == 0
    return out


@pytest.fixture
def ckpt(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "ckpt"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))


# --- Bad data -------------------------------------------------------------------

def test_missing_data_path(tmp_path, cli_fails):
    out = tmp_path / "run"
    cli_fails(train_args(tmp_path / "nope", out), "does not exist")
    assert not out.exists() and not leftovers(tmp_path, "run")


def test_empty_data_folder(tmp_path, cli_fails):
    (tmp_path / "empty").mkdir()
    cli_fails(train_args(tmp_path / "empty", tmp_path / "run"), "has no")
    assert not (tmp_path / "run").exists()


def test_glob_matching_nothing(tmp_path, cli_fails):
    cli_fails(train_args(tmp_path / "*.nothing", tmp_path / "run"), "matches nothing")
    assert not (tmp_path / "run").exists()


def test_corpus_too_small_leaves_no_output(tmp_path, cli_fails):
    """Fails only once training starts (the train split is shorter than one window):
    the --out folder must still not be created."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_text("def f():\n    return 1\n")
    out = tmp_path / "run"
    cli_fails(train_args(tmp_path / "data", out), "fewer than one window")
    assert not out.exists() and not leftovers(tmp_path, "run")


# --- Bad presets and config values ---------------------------------------------------

def test_unknown_preset_train(corpus, tmp_path, cli_fails):
    cli_fails(train_args(corpus, tmp_path / "run", "--preset", "huge"), "huge", "tiny")
    assert not (tmp_path / "run").exists()


def test_unknown_preset_info(cli_fails):
    cli_fails(["info", "--preset", "huge"], "huge", "tiny")


@pytest.mark.parametrize("flags, message", [
    (["--n-heads", "4", "--n-kv-heads", "3"], "divisible by n_kv_heads"),
    (["--p", "0.5"], "p must be in [0, 0.5)"),
    (["--p", "-0.1"], "p must be in [0, 0.5)"),
    (["--norm", "foo"], "norm must be one of"),
])
@pytest.mark.parametrize("command", ["train", "info"])
def test_invalid_config_values(corpus, tmp_path, command, flags, message, cli_fails):
    if command == "train":
        argv = train_args(corpus, tmp_path / "run", *flags)
    else:
        argv = ["info", "--preset", "tiny", *flags]
    cli_fails(argv, "invalid model config", message)
    assert not (tmp_path / "run").exists()


# --- Damaged checkpoints --------------------------------------------------------

def garbage(path: Path) -> None:
    path.write_bytes(b"\x93not a safetensors file\x00" * 64)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name, damage", [
    (WEIGHTS_FILE, garbage), (WEIGHTS_FILE, truncate), (TRAINING_STATE_FILE, truncate),
])
def test_damaged_checkpoint(ckpt, name, damage, cli_fails):
    damage(ckpt / name)
    if name == WEIGHTS_FILE:
        with pytest.raises(FANformerError, match="corrupted or truncated"):
            load_model(ckpt)
    before = snapshot(ckpt)
    cli_fails(["train", "--resume", "--out", ckpt, "--quiet"], "corrupted or truncated", name)
    assert snapshot(ckpt) == before


def test_checkpoint_missing_config(ckpt, cli_fails):
    (ckpt / CONFIG_FILE).unlink()
    with pytest.raises(FANformerError, match="missing config.json"):
        load_model(ckpt)
    cli_fails(["info", ckpt], "missing config.json")
    cli_fails(["train", "--resume", "--out", ckpt, "--quiet"], "missing config.json")


def test_info_reads_a_good_checkpoint(capsys, ckpt):
    assert main(["info", str(ckpt), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"] == load_model(ckpt).config.to_dict()


# --- Output directory and resume ------------------------------------------------

def test_existing_checkpoint_needs_force(corpus, ckpt, cli_fails):
    before = snapshot(ckpt)
    cli_fails(train_args(corpus, ckpt, "--max-steps", "3"), "already holds a checkpoint", "--force")
    assert snapshot(ckpt) == before
    assert not leftovers(ckpt.parent, ckpt.name)

    assert main(train_args(corpus, ckpt, "--max-steps", "3", "--force")) == 0
    assert json.loads((ckpt / TRAINER_STATE_FILE).read_text())["step"] == 3
    assert snapshot(ckpt)[WEIGHTS_FILE] != before[WEIGHTS_FILE]
    assert not leftovers(ckpt.parent, ckpt.name)


def test_resume_without_training_state(ckpt, cli_fails):
    (ckpt / TRAINING_STATE_FILE).unlink()
    (ckpt / TRAINER_STATE_FILE).unlink()
    cli_fails(["train", "--resume", "--out", ckpt, "--quiet"], "no training state")


def test_resume_missing_directory(tmp_path, cli_fails):
    cli_fails(["train", "--resume", "--out", tmp_path / "never", "--quiet"], "does not exist")
    assert not (tmp_path / "never").exists()


def test_resume_rejects_model_flags(ckpt, cli_fails):
    before = snapshot(ckpt)
    cli_fails(["train", "--resume", "--out", ckpt, "--quiet", "--n-layers", "3"], "--n-layers")
    assert snapshot(ckpt) == before


# --- info ---------------------------------------------------------------------------

def test_info_json_parameter_count(capsys):
    config = FANformerConfig.from_name("seed-92m")
    with torch.device("meta"):
        expected = count_parameters(FANformer(config))
    assert main(["info", "--preset", "seed-92m", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parameters"] == expected
    assert shown["config"] == config.to_dict()


# --- The real console script ------------------------------------------------------------

@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason="fanformer console script not installed")
@pytest.mark.parametrize("argv, message", [
    (["info", "--preset", "huge"], "huge"),
    (["train", "--data", "{tmp}/nope", "--out", "{tmp}/run", "--quiet"], "does not exist"),
])
def test_console_script_reports_errors_without_traceback(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([str(CONSOLE_SCRIPT), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


# --- generate and eval -----------------------------------------------------------------

def test_generate_streams_the_same_text_as_the_library(capsys, trained):
    from fanformer.runtime import GenerationConfig, generate, load_backend

    assert main(["generate", str(trained), "--prompt", "def f(", "--greedy", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    expected = generate(load_backend(trained), ["def f("], GenerationConfig(max_new_tokens=12, temperature=0))
    assert printed == "def f(" + expected[0].text + "\n"


def test_generate_batch_and_interactive(capsys, monkeypatch, trained):
    import io

    assert main(["generate", str(trained), "--prompt", "import", "--prompt", "class A:", "--greedy",
                 "--max-new-tokens", "5"]) == 0
    batch = capsys.readouterr().out
    assert batch.startswith("import") and "\n\nclass A:" in batch
    monkeypatch.setattr("sys.stdin", io.StringIO("import\n\nclass A:\n"))
    assert main(["generate", str(trained), "--greedy", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.replace("\n", "") == batch.replace("\n", "")


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x" * 400], "shorten it"),
])
def test_generate_bad_input(trained, flags, message, cli_fails):
    cli_fails(["generate", str(trained), *flags], message)


def test_eval_json_matches_the_library(trained, cli_eval_matches_library):
    cli_eval_matches_library(trained, 2000)


def test_eval_against_itself_as_reference(capsys, corpus, trained):
    assert main(["eval", str(trained), "--data", str(corpus), "--split", "all", "--ctx", "32", "--json",
                 "--quiet", "--max-tokens", "1000", "--reference", str(trained), "--reference-precision",
                 "native"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["kl_mean"] == pytest.approx(0, abs=1e-7) and reported["top1_agreement"] == 1.0
    assert reported["ppl_change"] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["eval", "{ckpt}", "--ctx", "4096"], "longer than the model's maximum context"),
    (["eval", "{tmp}/nothing"], "does not exist"),
    (["eval", "{tmp}/garbage.bin"], "is not a model this tool can run"),
    (["eval", "{ckpt}", "--format", "nope"], "unknown format"),
    (["eval", "{ckpt}", "--protocol", "sliding", "--stride", "1000", "--ctx", "32", "--split", "all",
      "--data", "{tmp}/one.txt"], "stride must be in"),
])
def test_eval_bad_input(trained, tmp_path, argv, message, cli_fails):
    (tmp_path / "garbage.bin").write_bytes(b"\x00" * 64)
    (tmp_path / "one.txt").write_text("some text " * 50)
    argv = [a.format(ckpt=trained, tmp=tmp_path) for a in argv]
    cli_fails(argv, message)


# --- Sizes, eval's announcement, generate at the context limit ----------------------------------

@pytest.mark.parametrize("argv", [
    ["eval", "{ckpt}", "--ctx", "0"], ["eval", "{ckpt}", "--ctx", "-5"], ["eval", "{ckpt}", "--max-tokens", "0"],
    ["eval", "{ckpt}", "--stride", "0"], ["eval", "{ckpt}", "--batch-size", "0"],
    ["generate", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"], ["generate", "{ckpt}", "--max-length", "-1"],
    ["drift", "{ckpt}", "--ctx", "0"], ["drift", "{ckpt}", "--max-tokens", "-1"], ["quickstart", "--max-steps", "0"],
])
def test_zero_and_negative_sizes_are_refused(trained, capsys, argv):
    argv = [a.format(ckpt=trained) for a in argv]
    with pytest.raises(SystemExit) as exit:  # argparse refuses it before any work
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"fanformer {argv[0]}: error: argument ")
    assert "must be" in errors[0] and argv[-1] in errors[0]


def test_eval_says_what_it_scores_and_how_to_limit_it(trained, corpus, capsys):
    assert main(["eval", str(trained), "--data", str(corpus), "--split", "val", "--ctx", "32"]) == 0
    err = capsys.readouterr().err
    assert "tokens of the val split at ctx 32; --max-tokens N scores fewer" in err
    assert main(["eval", str(trained), "--data", str(corpus), "--split", "val", "--ctx", "32", "--max-tokens",
                 "200"]) == 0
    err = capsys.readouterr().err
    assert "scoring 200 tokens of the val split" in err and "--max-tokens N" not in err


def test_generate_warns_when_it_stops_at_the_context(trained, capsys):
    # The model's context is 64: a 70-token budget cannot fit (EOS is held off until then).
    assert main(["generate", str(trained), "--prompt", "def ", "--max-new-tokens", "70", "--min-length", "64",
                 "--greedy", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ")
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "context of 64 tokens" in warnings[0]
    assert main(["generate", str(trained), "--prompt", "def ", "--max-new-tokens", "3", "--greedy",
                 "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_generate_never_echoes_a_prompt_it_rejects(trained, cli_fails, capsys):
    prompt = "the same words " * 40  # far over the 64-token context
    cli_fails(["generate", str(trained), "--prompt", prompt], "shorten it")
    assert prompt not in capsys.readouterr().out
