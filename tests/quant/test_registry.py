"""A new quantization method is one module: its config dataclass and a registered handler.
The CLI offers it with its own flags, refuses them for other methods, and the checkpoint it
writes runs. The toy method below is registered for the length of one test."""

import json
from dataclasses import dataclass

import pytest

from fanformer import quant
from fanformer.checkpoint import load_model
from fanformer.cli import main
from fanformer.config import knob
from fanformer.quant.config import WeightOnlyConfig
from fanformer.quant.rtn import rtn_quantize
from fanformer.runtime import load_backend


@dataclass(frozen=True)
class ClipRTNConfig(WeightOnlyConfig):
    """Round to nearest after clamping each weight to `clip` standard deviations (a test method)."""

    clip: float = knob(3.0, "clamp weights to this many standard deviations first")

    method = "cliprtn"


def clip_rtn(model, layers, config: ClipRTNConfig, calibration, progress):
    results = {}
    for name, layer in layers.items():
        limit = config.clip * float(layer.weight.std())
        results[name] = rtn_quantize(layer.weight.clamp(-limit, limit), config.bits, config.group_size, config.sym)
    return results


@pytest.fixture
def toy(monkeypatch):
    quant.methods()  # the real ones first, so the toy's removal leaves them in place
    monkeypatch.setitem(quant.METHODS, "cliprtn", ClipRTNConfig)
    monkeypatch.setitem(quant.HANDLERS, ClipRTNConfig, clip_rtn)


def test_cli_runs_a_registered_method_with_its_flags(toy, trained, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(trained), "--method", "cliprtn", "--clip", "0.5", "--group-size", "32",
                 "--out", str(out), "--quiet"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "cliprtn" and qc["bits"] == 4
    report = json.loads((out / "quant_report.json").read_text())
    assert report["config"]["clip"] == 0.5
    # The handler ran: clamped to half a standard deviation, the stored weights stay within
    # that bound (plus grid rounding), where the float weights reach far beyond it.
    original = load_model(trained).blocks[0].ffn.up_proj.weight.detach()
    bound = 0.5 * float(original.std())
    stored = load_backend(out).model.blocks[0].ffn.up_proj.dequantized_weight()
    assert float(original.abs().max()) > 2 * bound
    assert float(stored.abs().max()) <= 1.15 * bound


def test_its_flags_are_refused_for_other_methods(toy, trained, tmp_path, cli_fails):
    cli_fails(["quantize", trained, "--method", "rtn", "--clip", "2", "--out", tmp_path / "q"],
              "--clip does not apply to --method rtn", "--clip only applies to --method cliprtn")
    cli_fails(["quantize", trained, "--method", "cliprtn", "--act-order", "--out", tmp_path / "q"],
              "--act-order does not apply to --method cliprtn")
    assert not (tmp_path / "q").exists()
