"""The perplexity regression suite (`pytest -m drift`, run by CI): a small model trained
once per session is taken through every default variant of the drift table, and each
must stay within its budget in tests/drift_budget.json. A failure prints the table.

The budgets were set from measurements of this very model (1.3 times the drift
measured, see the file's _comment), so they are tight enough to catch a broken
quantizer or exporter: `test_budgets_bite` breaks one thing at a time (a scale 5% off,
Q/K rows in the wrong RoPE layout, nibbles packed in the wrong order) and checks that
the table then fails the variant.

The model is trained, not random: a random model's next-token distributions are so flat
that any rounding looks like no drift at all. Widths are multiples of 128 so that group
size 128 divides every linear layer, as it does in the presets.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from fanformer.pipeline import train_run
from fanformer.runtime.drift_budgets import load_budgets
from fanformer.runtime.drift_report import markdown
from fanformer.runtime.drift_table import TableConfig, run_drift_table
from fanformer.runtime.variants import DEFAULT_VARIANTS

pytestmark = pytest.mark.drift

BUDGET_FILE = Path(__file__).parents[1] / "drift_budget.json"
MODEL = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
             max_seq_len=128)
TRAIN = dict(max_steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=20, eval_every=0, save_every=0,
             log_every=100, eval_batches=1)
# Timing columns are left out (nothing here asserts a speed); 2,047 scored tokens.
TABLE = dict(max_tokens=2048, calib_samples=32, speed=False)


@pytest.fixture(scope="module")
def trained(corpus, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drift-regression") / "ckpt"
    train_run(out, data=[str(corpus)], model_overrides=MODEL, train_overrides=TRAIN, cache_dir=cache_dir,
              progress=False)
    return out


@pytest.fixture(scope="module")
def budgets():
    return load_budgets(BUDGET_FILE)


def drift_table(trained, corpus, cache_dir, budgets, out, variants):
    return run_drift_table(trained, out, TableConfig(variants=tuple(variants), **TABLE), data=[str(corpus)],
                           budgets=budgets, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def table(trained, corpus, cache_dir, budgets, tmp_path_factory):
    table = drift_table(trained, corpus, cache_dir, budgets, tmp_path_factory.mktemp("drift") / "out",
                        DEFAULT_VARIANTS)
    print("\n" + markdown(table))  # shown with -s, and in CI's log of a failure
    return table


@pytest.mark.parametrize("name", DEFAULT_VARIANTS)
def test_variant_within_budget(table, name):
    row = table.row(name)
    if row.status == "skipped":
        pytest.skip(f"{name}: {row.reason}")
    assert row.status == "ok", f"{name} {row.status}: {row.reason}\n\n{markdown(table)}"


def test_every_default_variant_has_a_budget(budgets):
    """A variant without its own budget would fall back to the loose defaults."""
    assert set(budgets) == set(DEFAULT_VARIANTS)
    for name, budget in budgets.items():
        assert {"max_kl_mean", "min_top1", "max_ppl_change"} <= set(budget), name


# --- Breaking one thing at a time ------------------------------------------------------------

def scales_off(monkeypatch):
    """The quantizer stores scales 5% larger than the ones its codes were rounded with."""
    from fanformer.quant import rtn as quant_rtn

    real = quant_rtn.rtn_quantize

    def rtn_quantize(*args, **kwargs):
        weight = real(*args, **kwargs)
        weight.scales = weight.scales * 1.05
        return weight

    monkeypatch.setattr(quant_rtn, "rtn_quantize", rtn_quantize)


def gguf_scales_off(monkeypatch):
    """The GGUF exporter quantizes every 2-D weight 5% too large (a wrong block scale)."""
    import fanformer.export.gguf_export as gguf_export

    real = gguf_export.quants.quantize

    class Quants:
        @staticmethod
        def quantize(array, qtype):
            return real(array * np.float32(1.05) if array.ndim == 2 else array, qtype)

    monkeypatch.setattr(gguf_export, "quants", Quants)


def rope_layout_wrong(monkeypatch):
    """Q and K rows written in llama.cpp's interleaved RoPE layout into a fanformer-arch
    file, whose loader expects the rotate-half layout."""
    import fanformer.export.gguf_export as gguf_export

    real = gguf_export.model_state_dict

    def model_state_dict(model):
        state = real(model)
        config = model.config
        for key in state:
            for suffix, heads in (("attn.q_proj.weight", config.n_heads), ("attn.k_proj.weight", config.n_kv_heads)):
                if key.endswith(suffix):
                    state[key] = torch.from_numpy(gguf_export.llama_permute(state[key].numpy(), heads).copy())
        return state

    monkeypatch.setattr(gguf_export, "model_state_dict", model_state_dict)


def nibbles_swapped(monkeypatch):
    """The GPTQ-to-GGUF carry packs the two halves of each q4_0 block the wrong way round."""
    import fanformer.export.gguf_carry as gguf_carry

    real = gguf_carry._nibbles
    monkeypatch.setattr(gguf_carry, "_nibbles", lambda q: real(np.concatenate([q[..., 16:], q[..., :16]], -1)))


BREAKS = {"quantizer scale x1.05": (scales_off, ["rtn-w4g128"]),
          "GGUF scale x1.05": (gguf_scales_off, ["gguf-q8_0", "gguf-q4_0"]),
          "Q/K in the wrong RoPE layout": (rope_layout_wrong, ["gguf-f16"]),
          "q4_0 nibbles swapped": (nibbles_swapped, ["gptq-w4g32-gguf"])}


@pytest.mark.parametrize("broken", BREAKS)
def test_budgets_bite(broken, trained, corpus, cache_dir, budgets, tmp_path, monkeypatch):
    breaks, variants = BREAKS[broken]
    breaks(monkeypatch)
    table = drift_table(trained, corpus, cache_dir, budgets, tmp_path / "out", variants)
    print(f"\n{broken}:\n" + markdown(table))
    for name in variants:
        assert table.row(name).status == "over budget", f"{broken} went unnoticed by {name}:\n{markdown(table)}"
