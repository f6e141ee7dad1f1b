"""Tests for fanformer/fftnet.py and the `mixer: fftnet` model: the pure functions against
direct formulas, causality by perturbing future tokens (and by gradients), cached decode
and left padding against the plain forward, and the CLI (train, eval, generate, export)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.fftnet import CausalSpectralFilter, causal_fft_conv, modrelu, running_mean, spectral_product
from fanformer.model import FANformer, FFTNetMixer

TINY = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
            max_seq_len=32, mixer="fftnet")


def fftnet_model(seed: int = 0, **overrides) -> FANformer:
    torch.manual_seed(seed)
    model = FANformer(FANformerConfig(**{**TINY, **overrides})).double().eval()
    with torch.no_grad():  # the context MLP starts at 0; give the modulation something to do
        for module in model.modules():
            if isinstance(module, CausalSpectralFilter):
                module.context[2].weight.normal_(0, 0.3)
                module.modrelu_bias.uniform_(-0.3, 0.1)
    return model


# --- Pure functions against direct formulas ---------------------------------------

@pytest.mark.parametrize("T, L", [(1, 4), (7, 16), (12, 5)])  # L < T: lags past the kernel are 0
def test_causal_fft_conv_is_the_direct_causal_sum(T, L):
    torch.manual_seed(0)
    u = torch.randn(2, T, 3, dtype=torch.float64)
    kernels = torch.randn(4, 3, L, dtype=torch.float64)
    expected = torch.zeros(2, T, 4, 3, dtype=torch.float64)
    for t in range(T):
        for s in range(max(0, t - L + 1), t + 1):
            expected[:, t] += kernels[None, :, :, t - s] * u[:, s, None, :]
    torch.testing.assert_close(causal_fft_conv(u, kernels), expected)


def test_export_form_of_the_spectral_product_is_the_complex_product(monkeypatch):
    torch.manual_seed(0)
    spectrum = torch.randn(2, 3, 5, dtype=torch.complex128)
    spectral_filter = torch.randn(4, 3, 5, dtype=torch.complex128)
    expected = spectrum[:, None] * spectral_filter
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # the real-arithmetic form
    torch.testing.assert_close(spectral_product(spectrum, spectral_filter), expected)


def test_running_mean_counts_only_real_tokens():
    torch.manual_seed(0)
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = running_mean(u, mask)
    for b in range(2):
        for t in range(6):
            real = [s for s in range(t + 1) if mask[b, s]]
            expected = u[b, real].mean(0) if real else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(got[b, t], expected)
    torch.testing.assert_close(running_mean(u), running_mean(u, torch.ones(2, 6)))


def test_modrelu_is_the_complex_formula_on_reals():
    z = torch.tensor([-2.0, -0.3, 0.2, 1.5], dtype=torch.float64)
    bias = torch.tensor([-0.5, -0.5, 0.1, 0.0], dtype=torch.float64)
    zc = z.to(torch.complex128)
    expected = (torch.relu(zc.abs() + bias) * zc / zc.abs()).real  # modReLU(z) = ReLU(|z| + b) z / |z|
    torch.testing.assert_close(modrelu(z, bias), expected)


# --- Causality ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(p=0.0, norm="hybrid"), dict(gated_residual=True)])
def test_future_tokens_do_not_change_earlier_outputs(overrides):
    model = fftnet_model(**overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 20))
    logits = model(ids)
    for j in (1, 9, 19):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.arange(2)) % 96
        moved = (model(changed) - logits).abs().amax(-1)  # (B, T)
        assert moved[:, :j].max() <= 1e-12, f"outputs before position {j} moved by {moved[:, :j].max()}"
        assert (moved[:, j] > 1e-3).all()  # the perturbed position itself does move


def test_gradients_reach_only_past_inputs():
    model = fftnet_model()
    x = torch.randn(1, 16, 32, dtype=torch.float64, requires_grad=True)
    mixer = model.blocks[0].attn
    for t in (0, 7, 15):
        (grad,) = torch.autograd.grad(mixer(x, None, None, None)[0, t].sum(), x)
        norms = grad[0].norm(dim=-1)  # (T,); the FFTs leave ~1e-16 of rounding on every position
        assert norms[t] > 1e-3 and (norms[t + 1:] < 1e-12 * norms[t]).all()


# --- Shapes and gradients ----------------------------------------------------------------

def test_mixer_shapes_and_gradients():
    config = FANformerConfig(**TINY)
    torch.manual_seed(0)
    mixer = FFTNetMixer(config, layer_idx=0)
    mixer.filter.reset_parameters()
    x = torch.randn(3, 11, config.d_model, requires_grad=True)
    y = mixer(x, None, None, None)
    assert y.shape == (3, 11, config.d_model)
    y.square().mean().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in mixer.named_parameters():
        assert param.grad is not None and param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name
    kernels = mixer.filter.kernels.grad
    assert kernels[..., :11].abs().sum() > 0 and (kernels[..., 11:] == 0).all()  # lags past T are unused


def test_spectral_filter_gradcheck():
    torch.manual_seed(0)
    layer = CausalSpectralFilter(channels=3, max_len=6).double()
    with torch.no_grad():
        layer.reset_parameters()
        layer.context[2].weight.normal_(0, 0.5)
        # b < 0: modReLU is continuous (b > 0 jumps from -b to b at z = 0, as padded positions sit).
        layer.modrelu_bias.fill_(-0.05)
    u = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: layer(v, mask), (u,))


# --- Decoding, padding, the model API ------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(norm="hybrid", cola_rank=0.5)])
def test_cached_decode_matches_the_full_forward(overrides):
    model = fftnet_model(**overrides)
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (2, 14))
    ids[0, :4] = 0  # row 0 is left-padded
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :4] = 0
    full = model(ids, attention_mask=mask)
    cache = model.new_cache()
    steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
    for t in range(8, 14):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[0, 4:], full[0, 4:], rtol=0, atol=1e-10)
    torch.testing.assert_close(cached[1], full[1], rtol=0, atol=1e-10)
    assert cache.get_seq_length() == 14


def test_left_padding_gives_the_unpadded_outputs():
    model = fftnet_model()
    torch.manual_seed(3)
    ids = torch.randint(3, 96, (1, 10))
    padded = torch.cat([torch.full((1, 5), 2), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 5:], model(ids), rtol=0, atol=1e-10)


def test_fftnet_replaces_attention_and_keeps_attention_models_unchanged():
    model = FANformer(FANformerConfig(**TINY))
    assert all(isinstance(block.attn, FFTNetMixer) for block in model.blocks)
    assert not any("q_proj" in name or "k_proj" in name for name, _ in model.named_parameters())
    attention = FANformer(FANformerConfig(**{**TINY, "mixer": "attention"}))
    assert not any("filter" in name for name, _ in attention.named_parameters())


def test_old_config_without_the_new_keys_loads_as_attention():
    data = FANformerConfig().to_dict()
    for key in ("head", "fourier_frequencies", "fourier_reg", "mixer"):
        data.pop(key)
    config = FANformerConfig.from_dict(data)
    assert config.mixer == "attention" and config.head == "linear"


def test_unknown_mixer_is_a_config_error(cli_fails):
    with pytest.raises(FANformerError, match="mixer must be one of"):
        FANformerConfig(mixer="fft")
    cli_fails(["info", "--preset", "tiny", "--mixer", "fft"], "mixer must be one of")


# --- CLI: train, eval, generate, export ------------------------------------------------------

CLI_MODEL = ["--vocab-size", "400", "--max-seq-len", "64", "--d-model", "32", "--head-dim", "8",
             "--mixer", "fftnet"]


@pytest.fixture(scope="module")
def trained_fftnet(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fftnet") / "ckpt"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--quiet", *CLI_MODEL, "--max-steps", "3",
                 "--batch-size", "2", "--eval-batches", "1"]) == 0
    return out


def test_cli_trains_and_evaluates_an_fftnet_model(trained_fftnet, cli_eval_matches_library):
    config = json.loads((trained_fftnet / "config.json").read_text())
    assert config["mixer"] == "fftnet"
    reported = cli_eval_matches_library(trained_fftnet, 1000)
    assert 1 < reported["ppl"] < 400 * 2


def test_cli_generation_matches_the_uncached_reference(capsys, trained_fftnet):
    from fanformer.runtime import load_backend, reference_greedy

    capsys.readouterr()
    assert main(["generate", str(trained_fftnet), "--prompt", "def f(", "--greedy", "--max-new-tokens", "10",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    backend = load_backend(trained_fftnet)
    reference = reference_greedy(backend, backend.tokenizer.encode("def f(").ids, 10)
    assert printed == "def f(" + backend.tokenizer.decode(reference, skip_special_tokens=True) + "\n"


def test_gguf_export_refuses_fftnet(trained_fftnet, tmp_path, cli_fails):
    cli_fails(["export", str(trained_fftnet), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
              "mixer = 'fftnet'", "--format onnx")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_onnx_export_runs_the_dft_and_matches_pytorch(trained_fftnet, tmp_path, caplog):
    import onnx

    from fanformer.export import onnx_export
    from fanformer.export import onnx_format as names
    from fanformer.runtime import validation

    out = onnx_export.export_onnx(trained_fftnet, tmp_path / "onnx",
                                   validate=validation.validate_onnx)
    model = onnx.load(str(out / "model.onnx"))
    assert "DFT" in {node.op_type for node in model.graph.node}
    # No fused kernel for this mixer: the default export falls back to the plain graph, and says so.
    assert {p.key: p.value for p in model.metadata_props}[names.META_GRAPH] == names.PLAIN
    assert "exporting the plain ONNX graph: the fftnet token mixer has no fused kernel" in caplog.text
    worst, top1 = validation.compare_logits(trained_fftnet, out)
    assert worst < 1e-3 and top1 == 1.0
    shutil.rmtree(out)
