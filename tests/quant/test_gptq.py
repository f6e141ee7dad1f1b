"""quant/gptq.py: GPTQ beats RTN on real layers; Hessian, dead columns, damping fallback."""

import logging

import pytest
import torch

from fanformer.checkpoint import load_model
from fanformer.errors import FANformerError
from fanformer.tokenizer import load_tokenizer
from fanformer.quant.calibration import calibration_tokens, calibration_windows
from fanformer.quant.gptq import Hessian, gptq_quantize, inverse_hessian_cholesky
from fanformer.quant.rtn import rtn_quantize


@pytest.fixture(scope="module")
def layer_inputs(trained, corpus, cache_dir):
    """Real inputs of real layers: calibration windows of the training split run through
    the trained model, captured by forward hooks."""
    model = load_model(trained)
    tokens = calibration_tokens(load_tokenizer(trained), [str(corpus)], samples=16, seq_len=64, cache_dir=cache_dir)
    names = ("blocks.0.attn.q_proj", "blocks.1.ffn.down_proj", "blocks.1.attn.fan.proj")
    captured = {}

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = inputs[0].detach()
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(capture(n)) for n in names]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return {n: (model.get_submodule(n).weight.detach(), captured[n]) for n in names}


def output_error(W, Q, X):
    X = X.reshape(-1, X.shape[-1])
    return float((X @ W.T - X @ Q.T).norm())


@pytest.mark.parametrize("name", ["blocks.0.attn.q_proj", "blocks.1.ffn.down_proj", "blocks.1.attn.fan.proj"])
@pytest.mark.parametrize("bits, group_size, sym, act_order",
                         [(4, 32, True, False), (4, 32, False, True), (3, -1, False, False), (2, 32, True, True)])
def test_gptq_output_error_below_rtn(layer_inputs, name, bits, group_size, sym, act_order):
    W, X = layer_inputs[name]
    hessian = Hessian(W.shape[1])
    for batch in X.split(4):
        hessian.add_batch(batch)
    gptq = gptq_quantize(W, hessian.H, bits, group_size, sym, act_order=act_order)
    rtn = rtn_quantize(W, bits, group_size, sym)
    assert output_error(W, gptq.dequantize(), X) < output_error(W, rtn.dequantize(), X)
    assert gptq.error > 0 and gptq.metric == "gptq_loss"


def test_hessian_running_mean_is_2xtx_over_samples():
    torch.manual_seed(0)
    X = torch.randn(6, 5, 8)  # 6 sequences of 5 tokens
    hessian = Hessian(8)
    for batch in X.split([1, 2, 3]):
        hessian.add_batch(batch)
    flat = X.reshape(-1, 8)
    torch.testing.assert_close(hessian.H, 2 * flat.T @ flat / 6)
    assert hessian.nsamples == 6


def test_act_order_g_idx_and_codes_are_consistent():
    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)  # distinct diagonal: a real permutation
    W = torch.randn(32, 64)
    result = gptq_quantize(W, 2 * X.T @ X / 256, 4, 32, sym=False, act_order=True)
    order = torch.argsort(torch.diag(X.T @ X), descending=True)
    assert torch.equal(result.g_idx[order], torch.arange(64, dtype=torch.int32) // 32)
    assert result.g_idx.bincount().tolist() == [32, 32]


def test_dead_columns_are_zeroed():
    torch.manual_seed(0)
    X = torch.randn(128, 32)
    X[:, 3] = 0  # an input that never fires
    W = torch.randn(16, 32)
    result = gptq_quantize(W, 2 * X.T @ X / 128, 4, -1, sym=False)
    assert torch.equal(result.dequantize()[:, 3], torch.zeros(16))


def test_indefinite_hessian_retries_with_more_damping(caplog):
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1 and 3
    with caplog.at_level(logging.WARNING, logger="fanformer.quant.gptq"):
        U = inverse_hessian_cholesky(H, 0.01)
    assert torch.isfinite(U).all() and "retrying" in caplog.text
    with pytest.raises(FANformerError, match="not positive definite"):
        inverse_hessian_cholesky(torch.tensor([[1.0, 1e4], [1e4, 1.0]]), 0.01)


def test_non_finite_hessian_is_an_error():
    H = torch.eye(4)
    H[1, 2] = float("nan")
    with pytest.raises(FANformerError, match="non-finite"):
        gptq_quantize(torch.randn(4, 4), H, 4, -1, sym=True)


def test_calibration_windows_are_seeded_and_checked():
    tokens = torch.arange(1000).numpy()
    a, b = calibration_windows(tokens, 8, 32, seed=1), calibration_windows(tokens, 8, 32, seed=1)
    assert a.shape == (8, 32) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.int64))  # contiguous windows
    with pytest.raises(FANformerError, match="calibration data too small"):
        calibration_windows(tokens, 64, 32)
