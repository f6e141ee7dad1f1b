"""Fixtures for the quantization tests: one briefly trained tiny checkpoint (real weights,
so real calibration inputs and a meaningful drift), shared by every quant test."""

from pathlib import Path

import pytest

from fanformer.pipeline import train_run

# Widths that pack at every bit width (multiples of 32) and divide by group size 32.
MODEL = dict(vocab_size=384, max_seq_len=64, d_model=64, ffn_dim=192, head_dim=16, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def trained(corpus, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "ckpt"
    train_run(out, data=[str(corpus)], model_overrides=MODEL,
              train_overrides=dict(max_steps=250, batch_size=8, seq_len=64, eval_every=0, save_every=0,
                                   log_every=50, warmup_steps=10, lr=3e-3, eval_batches=1),
              cache_dir=cache_dir, progress=False)
    return out
