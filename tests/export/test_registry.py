"""A new export format is one module that registers itself: the CLI's --format choices,
its flags, the default output name and the refusal of other formats' flags all follow.
The toy format below is such a module, registered for the length of one test."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from fanformer.checkpoint import load_model
from fanformer.cli import main
from fanformer.config import knob
from fanformer.errors import FANformerError
from fanformer.export import FORMATS, ExportFormat, default_output, export
from fanformer.outputs import write_file_atomically


@dataclass(frozen=True)
class ToyOptions:
    scale: float = knob(1.0, "multiply every weight by this")

    def __post_init__(self):
        if self.scale <= 0:
            raise FANformerError(f"--scale must be > 0, got {self.scale}")


def toy_write(checkpoint: Path, out: Path, options: ToyOptions, force: bool, validate) -> Path:
    if out.exists() and not force:
        raise FANformerError(f"{out} exists; pass --force")
    state = load_model(checkpoint).state_dict()
    sums = {name: float(tensor.sum()) * options.scale for name, tensor in state.items()}

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(sums))
        if validate is not None:
            validate(checkpoint, tmp, "toy")

    return write_file_atomically(out, write)


TOY = ExportFormat("toy", "weight sums as JSON (a test format)", ToyOptions,
                   lambda checkpoint, options: checkpoint.with_name(f"{checkpoint.name}-x{options.scale:g}.json"),
                   toy_write)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FORMATS, "toy", TOY)
    return TOY


def test_cli_takes_a_registered_format_and_its_flags(toy, overfit_checkpoint, tmp_path, capsys):
    out = tmp_path / "sums.json"
    assert main(["export", str(overfit_checkpoint), "--format", "toy", "--scale", "2", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    state = load_model(overfit_checkpoint).state_dict()
    sums = json.loads(out.read_text())
    assert sums.keys() == state.keys()
    assert sums["embed.weight"] == pytest.approx(2 * float(state["embed.weight"].sum()))
    assert default_output(overfit_checkpoint, "toy", scale=3) == overfit_checkpoint.with_name(
        f"{overfit_checkpoint.name}-x3.json")


def test_flags_of_one_format_are_refused_for_another(toy, overfit_checkpoint, tmp_path, cli_fails):
    cli_fails(["export", overfit_checkpoint, "--format", "gguf", "--scale", "2", "--out", tmp_path / "m.gguf"],
              "--scale does not apply to --format gguf", "--scale only applies to --format toy")
    cli_fails(["export", overfit_checkpoint, "--format", "toy", "--type", "q8_0", "--out", tmp_path / "t.json"],
              "--type does not apply to --format toy")
    cli_fails(["export", overfit_checkpoint, "--format", "toy", "--scale", "0", "--out", tmp_path / "t.json"],
              "--scale must be > 0")
    assert list(tmp_path.iterdir()) == []


def test_the_application_passes_the_validator(toy, overfit_checkpoint, tmp_path):
    """export() hands the caller's check to the writer, which runs it before the rename."""
    seen = []
    out = export(overfit_checkpoint, "toy", tmp_path / "t.json", validate=lambda *args: seen.append(args))
    assert seen and seen[0][0] == overfit_checkpoint and seen[0][2] == "toy" and out.is_file()

    def refuse(checkpoint, tmp, kind):
        raise FANformerError("validation failed: simulated")

    with pytest.raises(FANformerError, match="simulated"):
        export(overfit_checkpoint, "toy", tmp_path / "u.json", validate=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
