"""Tests for fanformer/fourier_head.py and the `head: fourier` model: the autocorrelation
against numpy, the density against |A(z)|^2 and the paper's series, a valid distribution
out of the head, the penalty against the integral of p'(z)^2 and in the training loss,
config errors, and the CLI (train, eval, export)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.fourier_head import (DENSITY_FLOOR, FourierHead, autocorrelation, bin_centres, factored_density,
                                    fourier_tables, series_density, smoothness_penalty)
from fanformer.model import FANformer

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
            max_seq_len=32, head="fourier", fourier_frequencies=8)


def random_coefficients(shape=(3, 5), n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, n, generator=g, dtype=torch.float64), torch.randn(*shape, n, generator=g,
                                                                                  dtype=torch.float64)


# --- The construction against independent references ----------------------------------

def test_autocorrelation_matches_numpy():
    a_re, a_im = random_coefficients(shape=(2,))
    c_re, c_im = autocorrelation(a_re, a_im)
    for row in range(2):
        a = (a_re[row] + 1j * a_im[row]).numpy()
        full = np.correlate(a, a, mode="full")  # full[n - 1 + k] = sum_l a[l + k] conj(a[l])
        expected = full[len(a) - 1:]
        np.testing.assert_allclose(c_re[row].numpy(), expected.real, atol=1e-12)
        np.testing.assert_allclose(c_im[row].numpy(), expected.imag, atol=1e-12)


def test_density_is_the_squared_modulus_and_integrates_to_one():
    a_re, a_im = random_coefficients()
    z = -1 + (2 * torch.arange(4096, dtype=torch.float64) + 1) / 4096  # midpoints: exact for these degrees
    cos, sin = fourier_tables(8, z, torch.float64)
    a = torch.complex(a_re, a_im)
    l = torch.arange(9, dtype=torch.float64)[:, None]
    A = (a[..., None] * torch.exp(1j * math.pi * l * z)).sum(-2)  # sum_l a_l e^{i pi l z}
    expected = A.abs() ** 2 / (2 * (a.abs() ** 2).sum(-1, keepdim=True))
    factored = factored_density(a_re, a_im, cos, sin)
    torch.testing.assert_close(factored, expected)
    torch.testing.assert_close(series_density(*autocorrelation(a_re, a_im), cos, sin), expected)  # the paper's form
    assert (factored >= 0).all()
    torch.testing.assert_close(factored.mean(-1) * 2, torch.ones(3, 5, dtype=torch.float64))  # integral over [-1, 1]


def test_penalty_is_the_integral_of_the_squared_derivative():
    a_re, a_im = random_coefficients(shape=(4,), seed=1)
    z = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    cos, sin = fourier_tables(8, z, torch.float64)
    p = factored_density(a_re, a_im, cos, sin)
    derivative = torch.diff(p, dim=-1) / torch.diff(z)
    integral = (derivative ** 2 * torch.diff(z)).sum(-1)
    torch.testing.assert_close(smoothness_penalty(*autocorrelation(a_re, a_im)), integral, rtol=1e-4, atol=0)


def test_penalty_is_larger_for_high_frequencies_of_equal_norm():
    n = 9
    low, high = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    low[0] = high[0] = 1.0
    low[1] = high[n - 1] = 0.5  # the same coefficient norm, at frequency 1 or N
    zeros = torch.zeros(n, dtype=torch.float64)
    r_low = smoothness_penalty(*autocorrelation(low, zeros))
    r_high = smoothness_penalty(*autocorrelation(high, zeros))
    assert r_high > r_low > 0
    torch.testing.assert_close(r_high / r_low, torch.tensor((n - 1) ** 2, dtype=torch.float64))  # k^2 weighting
    # The autocorrelations themselves have equal norm: only the frequency differs.
    torch.testing.assert_close(torch.stack(autocorrelation(low, zeros)).norm(),
                               torch.stack(autocorrelation(high, zeros)).norm())


# --- The head and the model ---------------------------------------------------------------

def test_head_outputs_a_distribution_over_the_bins():
    torch.manual_seed(0)
    head = FourierHead(16, num_bins=50, num_frequencies=6)
    head.reset_parameters()
    with torch.no_grad():
        head.proj.weight.normal_(0, 1.0)  # far from the near-uniform start
    h = torch.randn(2, 7, 16)
    log_q = head(h)
    assert log_q.shape == (2, 7, 50) and torch.isfinite(log_q).all()
    q = log_q.double().exp()
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 7, dtype=torch.float64))
    # q_i = (p(b_i) + floor) / sum_j (p(b_j) + floor), with p from the independent |A|^2 formula.
    a = head.proj(h).double()
    a = torch.complex(a[..., :7], a[..., 7:])
    b = bin_centres(50)
    l = torch.arange(7, dtype=torch.float64)[:, None]
    A = (a[..., None] * torch.exp(1j * math.pi * l * b)).sum(-2)
    p = A.abs() ** 2 / (2 * (a.abs() ** 2).sum(-1, keepdim=True)) + DENSITY_FLOOR
    torch.testing.assert_close(q, p / p.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)


def test_model_logits_are_log_probabilities_and_aux_is_the_weighted_penalty():
    torch.manual_seed(0)
    model = FANformer(FANformerConfig(**TINY, fourier_reg=0.3)).eval()
    ids = torch.randint(0, 64, (2, 9))
    logits, aux = model(ids, return_aux=True)
    torch.testing.assert_close(logits, model(ids))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 9))
    torch.testing.assert_close(logits, F.log_softmax(logits, dim=-1))  # cross-entropy sees them unchanged
    h = model.norm(_hidden(model, ids))
    a_re, a_im = model.lm_head.coefficients(h)
    torch.testing.assert_close(aux, 0.3 * smoothness_penalty(*autocorrelation(a_re, a_im)).mean())
    linear = FANformer(FANformerConfig(**{**TINY, "head": "linear"}))
    assert linear(ids, return_aux=True)[1].item() == 0.0


def _hidden(model, ids):
    captured = {}
    handle = model.norm.register_forward_hook(lambda m, inputs, out: captured.setdefault("x", inputs[0]))
    model(ids)
    handle.remove()
    return captured["x"]


def test_training_step_adds_the_penalty_to_the_loss():
    """fanformer.training.optimizer_step's update is the gradient of CE + fourier_reg * R."""
    from fanformer.training import Dist, TrainConfig, lm_loss, optimizer_step

    config = FANformerConfig(**TINY, fourier_reg=0.5)
    torch.manual_seed(0)
    model = FANformer(config)
    reference = FANformer(config)
    reference.load_state_dict(model.state_dict())
    tokens = np.random.default_rng(0).integers(0, 64, 200)
    starts = np.array([3, 50])
    train = TrainConfig(batch_size=2, grad_clip=0.0, seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer_step(model, model, optimizer, tokens, starts, 16, train, Dist(), torch.device("cpu"))

    rows = torch.from_numpy(np.stack([tokens[s:s + 17] for s in starts]))
    logits, aux = reference(rows[:, :-1], return_aux=True)
    (lm_loss(logits, rows[:, 1:]) + aux).backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(model.state_dict()[name], before[name] - param.grad, msg=name)
    assert aux > 0 and reference.lm_head.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(tie_embeddings=True), "set tie_embeddings false"),
    (dict(cola_rank=0.25, cola_lm_head=True), "cola_lm_head applies to the linear head only"),
    (dict(fourier_frequencies=40), "at most vocab_size / 2"),
    (dict(fourier_frequencies=0), "fourier_frequencies must be a positive integer"),
    (dict(fourier_reg=-1.0), "fourier_reg must be >= 0"),
    (dict(head="softmax"), "head must be one of"),
])
def test_bad_fourier_configs_are_config_errors(overrides, message):
    with pytest.raises(FANformerError, match=message):
        FANformerConfig(**{**TINY, **overrides})


def test_cli_refuses_a_fourier_head_on_a_tied_preset(cli_fails):
    cli_fails(["info", "--preset", "paper-300m", "--head", "fourier"], "set tie_embeddings false")


def test_default_models_are_unchanged_by_the_new_options():
    torch.manual_seed(0)
    before = FANformer(FANformerConfig.from_name("tiny"))
    torch.manual_seed(0)
    explicit = FANformer(FANformerConfig.from_name("tiny", head="linear", mixer="attention",
                                                   fourier_frequencies=3, fourier_reg=9.0))
    assert before.state_dict().keys() == explicit.state_dict().keys()
    for key, value in before.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key


# --- CLI: train, eval, export ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_fourier(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fourier") / "ckpt"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--quiet", "--vocab-size", "400",
                 "--max-seq-len", "64", "--d-model", "32", "--head-dim", "8", "--head", "fourier",
                 "--fourier-frequencies", "12", "--max-steps", "3", "--batch-size", "2", "--eval-batches", "1"]) == 0
    return out


def test_cli_trains_and_evaluates_a_fourier_head_model(trained_fourier, cli_eval_matches_library):
    saved = json.loads((trained_fourier / "config.json").read_text())
    assert saved["head"] == "fourier" and saved["fourier_frequencies"] == 12
    metrics = [json.loads(line) for line in (trained_fourier / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in metrics)
    reported = cli_eval_matches_library(trained_fourier, 1000)
    assert 1 < reported["ppl"] < 1 / DENSITY_FLOOR


def test_gguf_export_refuses_the_fourier_head(trained_fourier, tmp_path, cli_fails):
    cli_fails(["export", str(trained_fourier), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
              "head = 'fourier'", "--format onnx")


@pytest.mark.slow
def test_onnx_export_matches_pytorch(trained_fourier, tmp_path, caplog):
    from fanformer.export import onnx_export
    from fanformer.runtime import validation

    out = onnx_export.export_onnx(trained_fourier, tmp_path / "onnx",
                                   validate=validation.validate_onnx)
    assert "exporting the plain ONNX graph: the fourier LM head has no fused kernel" in caplog.text
    worst, top1 = validation.compare_logits(trained_fourier, out)
    assert worst < 1e-3 and top1 == 1.0
    shutil.rmtree(out)
