"""Tests for fanformer.modular: the held-out square never reaches training, the two
models have equal parameter counts, and `fanformer experiment modular` writes its
results, heat maps and loadable checkpoints."""

import json

import numpy as np
import pytest
import torch

from fanformer.checkpoint import load_model
from fanformer.cli import main
from fanformer.modular import (
    SQUARE,
    TASKS,
    ExperimentConfig,
    examples,
    grid,
    in_square,
    matched_transformer,
    model_configs,
    parameter_count,
    split_accuracy,
    task_tokenizer,
    training_pairs,
)
from fanformer.tokenizer import load_tokenizer

# Small enough for a test: a few seconds per model on one core.
TINY = ["--d-model", "32", "--n-heads", "2", "--ffn-dim", "64", "--steps", "3", "--batch-size", "64",
        "--eval-every", "2", "--seeds", "2"]


@pytest.mark.parametrize("name", list(TASKS))
def test_square_never_in_training_data(name):
    task = TASKS[name]
    a, b = training_pairs(task)
    a0, b0 = task.square
    assert not ((a >= a0) & (a < a0 + SQUARE) & (b >= b0) & (b < b0 + SQUARE)).any()
    assert len(a) == task.size ** 2 - SQUARE ** 2  # everything else is trained on
    assert len(set(zip(a.tolist(), b.tolist()))) == len(a)
    # The encoded training inputs hold no square pair either: tokens are the numbers themselves.
    inputs, targets = examples(task_tokenizer(task), task, a, b)
    seen = {(int(x), int(y)) for x, y in inputs[:, :2]}
    square = {(x, y) for x in range(a0, a0 + SQUARE) for y in range(b0, b0 + SQUARE)}
    assert not seen & square


@pytest.mark.parametrize("name", list(TASKS))
def test_square_is_centred_and_inside_the_grid(name):
    task = TASKS[name]
    a, b = grid(task)
    mask = in_square(task, a, b).reshape(task.size, task.size)
    assert int(mask.sum()) == SQUARE * SQUARE
    rows = mask.any(1).nonzero().flatten()
    assert rows[0] > 0 and rows[-1] < task.size - 1
    assert abs(int(rows[0]) - (task.size - 1 - int(rows[-1]))) <= 1  # centred


def test_answers_and_tokens():
    add_mod, linear = TASKS["add_mod"], TASKS["linear"]
    assert add_mod.max_number == 112 and linear.max_number == 300
    tokenizer = task_tokenizer(linear)
    inputs, targets = examples(tokenizer, linear, torch.tensor([7, 99]), torch.tensor([5, 99]))
    assert targets.tolist() == [7 + 10 + 3, 300]
    assert tokenizer.encode("7 5 =").ids == inputs[0].tolist()
    assert [tokenizer.id_to_token(i) for i in targets.tolist()] == ["20", "300"]
    _, targets = examples(task_tokenizer(add_mod), add_mod, torch.tensor([100]), torch.tensor([50]))
    assert targets.tolist() == [37]


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("shape", [dict(), dict(d_model=64, n_layers=3, ffn_dim=192), dict(d_model=32, n_heads=2, ffn_dim=64)])
def test_models_have_equal_parameter_counts(name, shape):
    configs = model_configs(ExperimentConfig(**shape), task_tokenizer(TASKS[name]).get_vocab_size())
    fan, plain = configs["fanformer"], configs["transformer"]
    assert fan.p > 0 and plain.p == 0
    assert plain.replace(ffn_dim=fan.ffn_dim) == fan.replace(p=0.0)  # only the FFN width differs
    n_fan, n_plain = parameter_count(fan), parameter_count(plain)
    assert abs(n_fan - n_plain) / n_fan < 0.02
    # and no other FFN width would be closer
    for width in (plain.ffn_dim - 1, plain.ffn_dim + 1):
        assert abs(parameter_count(plain.replace(ffn_dim=width)) - n_fan) >= abs(n_plain - n_fan)


def test_matched_transformer_of_a_transformer_is_itself():
    fan = model_configs(ExperimentConfig(), 118)["fanformer"]
    assert matched_transformer(fan.replace(p=0.0)) == fan.replace(p=0.0)


def test_split_accuracy():
    task = TASKS["linear"]
    acc = np.ones((task.size, task.size))
    a0, b0 = task.square
    acc[a0:a0 + SQUARE, b0:b0 + SQUARE] = 0
    acc[0, 0] = 0
    result = split_accuracy(task, acc)
    assert result["square_acc"] == 0
    assert result["train_acc"] == pytest.approx(1 - 1 / (task.size ** 2 - SQUARE ** 2))


def test_bad_config_is_a_user_error(cli_fails, tmp_path):
    cli_fails(["experiment", "modular", "--out", tmp_path / "x", "--steps", "0"], "steps must be positive")
    cli_fails(["experiment", "modular", "--out", tmp_path / "x", "--p", "0"], "p must be in (0, 0.5)")
    cli_fails(["experiment", "modular", "--out", tmp_path / "x", "--head", "softmax"], "head")
    cli_fails(["experiment", "modular", "--out", tmp_path / "x", "--jobs", "-1"], "jobs")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("modular") / "run"
    assert main(["experiment", "modular", "--task", "add_mod", "--out", str(out), "--quiet", *TINY,
                 "--jobs", "2"]) == 0
    return out


def test_experiment_writes_results_heatmaps_and_checkpoints(experiment, capsys):
    results = json.loads((experiment / "results.json").read_text())
    task = results["tasks"]["add_mod"]
    assert task["square"] == {"a": [46, 66], "b": [46, 66]}
    assert task["train_examples"] == 113 ** 2 - 441 and task["square_examples"] == 441
    models = task["models"]
    assert set(models) == {"fanformer", "transformer"}
    assert abs(models["fanformer"]["parameters"] - models["transformer"]["parameters"]) \
        / models["fanformer"]["parameters"] < 0.02
    for name, entry in models.items():
        assert [run["seed"] for run in entry["runs"]] == [0, 1]
        assert 0 <= entry["square_acc"]["mean"] <= 1 and entry["train_acc"]["std"] >= 0
        assert [r["step"] for r in entry["runs"][0]["history"]] == [2, 3]
    assert (experiment / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(experiment.glob(".*"))  # no temporary files left behind


def test_experiment_checkpoints_load_and_agree_with_the_results(experiment):
    results = json.loads((experiment / "results.json").read_text())
    task = TASKS["add_mod"]
    for name, entry in results["tasks"]["add_mod"]["models"].items():
        run = entry["runs"][1]
        path = experiment / "add_mod" / f"{name}-seed1"
        model, tokenizer = load_model(path), load_tokenizer(path)
        assert model.config.p == (0.0 if name == "transformer" else 0.25)
        inputs, targets = examples(tokenizer, task, *grid(task))
        with torch.no_grad():
            right = (model(inputs)[:, -1].argmax(-1) == targets).float().reshape(task.size, task.size).numpy()
        assert split_accuracy(task, right) == pytest.approx({k: run[k] for k in ("train_acc", "square_acc")})
        saved = json.loads((path / "modular_run.json").read_text())
        assert saved["seed"] == 1 and saved["task"] == "add_mod"


def test_same_seed_same_result(experiment, tmp_path):
    """The run is a function of its flags: training again, in this process instead of two
    workers, gives the same numbers."""
    out = tmp_path / "again"
    assert main(["experiment", "modular", "--task", "add_mod", "--out", str(out), "--quiet", *TINY,
                 "--jobs", "1"]) == 0
    first = json.loads((experiment / "results.json").read_text())["tasks"]["add_mod"]["models"]
    again = json.loads((out / "results.json").read_text())["tasks"]["add_mod"]["models"]
    for name in first:
        for a, b in zip(first[name]["runs"], again[name]["runs"]):
            assert a["history"] == b["history"]


def test_experiment_refuses_to_overwrite(experiment, cli_fails):
    before = (experiment / "results.json").read_bytes()
    cli_fails(["experiment", "modular", "--task", "add_mod", "--out", experiment, "--quiet", *TINY],
              "already holds", "--force")
    assert (experiment / "results.json").read_bytes() == before


def test_experiment_json_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["experiment", "modular", "--task", "linear", "--out", str(out), "--quiet", *TINY, "--seeds", "1",
            "--jobs", "1"]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "results.json").read_text())
    assert main([*args, "--force"]) == 0
    table = capsys.readouterr().out
    assert "linear" in table and "fanformer" in table and "transformer" in table and "square acc" in table


def test_fourier_head_option(tmp_path):
    out = tmp_path / "run"
    assert main(["experiment", "modular", "--task", "add_mod", "--out", str(out), "--quiet", *TINY,
                 "--seeds", "1", "--jobs", "1", "--head", "fourier", "--fourier-frequencies", "8"]) == 0
    model = load_model(out / "add_mod" / "fanformer-seed0")
    assert model.config.head == "fourier" and model.config.fourier_frequencies == 8
    results = json.loads((out / "results.json").read_text())["tasks"]["add_mod"]["models"]
    assert abs(results["fanformer"]["parameters"] - results["transformer"]["parameters"]) \
        / results["fanformer"]["parameters"] < 0.02


def test_analyze_fourier_on_an_experiment_checkpoint(experiment, capsys):
    path = experiment / "add_mod" / "fanformer-seed0"
    assert main(["analyze", "fourier", str(path), "--layers", "--json", "--out", str(experiment / "fourier")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["numbers"] == [0, 112]
    assert list(result["representations"]) == ["embedding", "layer 1", "layer 2"]
