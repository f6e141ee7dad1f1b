"""Tests for fanformer.fourier_analysis: the DFT recovers planted periods, number tokens are
found by their strings, and `fanformer analyze fourier` runs on a checkpoint."""

import json

import numpy as np
import pytest
import torch

from fanformer.checkpoint import save_checkpoint
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.fourier_analysis import (
    dominant_periods,
    magnitude_spectrum,
    number_representations,
    number_token_ids,
)
from fanformer.model import FANformer
from fanformer.modular import TASKS, task_tokenizer


def planted(length: int, periods: dict[float, float], dims: int = 32, noise: float = 0.1,
            seed: int = 0) -> np.ndarray:
    """Embeddings (length, dims): cos(2 pi n / T + phase) * amplitude in a few dims each, plus noise."""
    rng = np.random.default_rng(seed)
    n = np.arange(length)[:, None]
    x = noise * rng.standard_normal((length, dims))
    for i, (period, amplitude) in enumerate(periods.items()):
        cols = slice(4 * i, 4 * i + 4)
        x[:, cols] += amplitude * np.cos(2 * np.pi * n / period + rng.uniform(0, 2 * np.pi, 4))
    return x + 3.0  # an offset (the k = 0 term) must not matter


def test_planted_period_comes_first():
    peaks = dominant_periods(magnitude_spectrum(planted(100, {10: 1.0})), 100)
    assert peaks[0].k == 10 and peaks[0].period == pytest.approx(10.0)
    assert peaks[0].magnitude > 5 * peaks[1].magnitude  # the rest is noise
    assert peaks[0].over_median > 5 and peaks[1].over_median < 2


def test_flat_spectrum_has_no_standout_peak():
    peaks = dominant_periods(magnitude_spectrum(planted(100, {}, noise=1.0)), 100)
    assert all(p.over_median < 2 for p in peaks)


def test_several_planted_periods_in_order_of_strength():
    peaks = dominant_periods(magnitude_spectrum(planted(100, {10: 2.0, 2: 1.0, 5: 0.6})), 100, top=4)
    assert [p.period for p in peaks[:3]] == pytest.approx([10.0, 2.0, 5.0])
    assert peaks[2].magnitude > 2 * peaks[3].magnitude


def test_a_period_that_does_not_divide_the_range_is_one_peak():
    """Period 10 over 113 numbers lies between bins 11 and 12: one peak, near 10, not two."""
    peaks = dominant_periods(magnitude_spectrum(planted(113, {10: 1.0})), 113, top=2)
    assert 9.4 < peaks[0].period < 10.6
    assert peaks[1].magnitude < 0.5 * peaks[0].magnitude


def test_spectrum_of_pure_cosine_matches_the_dft():
    x = np.cos(2 * np.pi * np.arange(64) / 8)[:, None]
    spectrum = magnitude_spectrum(x)
    assert spectrum.shape == (33,)
    assert spectrum[8] == pytest.approx(32.0)  # |sum cos^2| = L/2
    assert np.delete(spectrum, 8).max() < 1e-9


def test_number_tokens_found_by_string():
    tokenizer = task_tokenizer(TASKS["add_mod"])
    assert number_token_ids(tokenizer) == list(range(113))
    assert number_token_ids(tokenizer, max_number=20) == list(range(21))


def test_missing_number_tokens_are_a_user_error():
    from fanformer.errors import FANformerError

    tokenizer = task_tokenizer(TASKS["add_mod"])
    with pytest.raises(FANformerError, match="no token for the number 113"):
        number_token_ids(tokenizer, max_number=200)


def test_hidden_states_are_the_residual_stream_after_each_block():
    config = FANformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                             ffn_dim=64, max_seq_len=8)
    torch.manual_seed(0)
    model = FANformer(config).eval()
    reps = number_representations(model, list(range(30)), layers=True)
    assert list(reps) == ["embedding", "layer 1", "layer 2"]
    ids = torch.arange(30)[:, None]
    x = model.embed(ids)
    cos, sin = torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)  # position 0: RoPE is the identity
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            x = block(x, cos, sin, None)
            np.testing.assert_allclose(reps[f"layer {i + 1}"], x[:, 0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def number_checkpoint(tmp_path):
    """A tiny untrained model over the add_mod vocabulary with period 10 planted in its embeddings."""
    tokenizer = task_tokenizer(TASKS["add_mod"])
    config = FANformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2,
                             n_kv_heads=2, head_dim=16, ffn_dim=64, max_seq_len=8)
    torch.manual_seed(0)
    model = FANformer(config)
    with torch.no_grad():
        model.embed.weight[:113] = torch.from_numpy(planted(113, {10: 1.0}, dims=32, noise=0.02)).float()
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer)


def test_cli_analyze_fourier(number_checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "fourier", str(number_checkpoint), "--layers", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["numbers"] == [0, 112]
    assert set(result["representations"]) == {"embedding", "layer 1", "layer 2"}
    assert 9.4 < result["representations"]["embedding"]["peaks"][0]["period"] < 10.6
    assert (out / "fourier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "fourier.json").read_text()) == result


def test_cli_analyze_fourier_table_and_default_out(number_checkpoint, capsys):
    assert main(["analyze", "fourier", str(number_checkpoint), "--max-number", "99"]) == 0
    printed = capsys.readouterr().out
    assert "numbers 0..99 (L = 100)" in printed and "embedding" in printed
    assert (number_checkpoint.parent / "ckpt-fourier" / "fourier.png").is_file()


def test_cli_analyze_fourier_without_number_tokens(tmp_path, cli_fails):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fanformer.tokenizer import BOS, EOS, PAD

    words = ["0", "1", "2", "x", BOS, EOS, PAD]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="x"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = FANformerConfig(vocab_size=len(words), d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                             head_dim=16, ffn_dim=64, max_seq_len=8)
    ckpt = save_checkpoint(tmp_path / "ckpt", FANformer(config), tokenizer)
    cli_fails(["analyze", "fourier", ckpt], "single tokens for 0..2 only")
    cli_fails(["analyze", "fourier", tmp_path / "missing"], "does not exist")
