"""AWQ (quant/awq.py): scale folding is exact on every model option, the periodic FAN
channels are never scaled, the clipping search finds the brute-force optimum, and on
real calibration inputs the search improves on plain round-to-nearest."""

import itertools

import pytest
import torch

from fanformer.checkpoint import load_model
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import load_tokenizer
from fanformer.quant import AWQConfig, RTNConfig, quantize
from fanformer.quant.awq import apply_scales, block_groups, group_output_error, pseudo_quantize, search_clip
from fanformer.quant.calibration import calibration_tokens

OPTIONS = [dict(), dict(norm="hybrid"), dict(cola_rank=0.25, cola_lm_head=True), dict(fan_activation="gelu"),
           dict(p=0), dict(gated_residual=True, n_kv_heads=4), dict(n_kv_heads=1),
           dict(norm="hybrid", cola_rank=0.5, p=0.4), dict(mixer="fftnet")]


def stages(model):
    return [f"blocks.{i}." for i in range(len(model.blocks))] + ["lm_head"]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_folding_random_scales_leaves_logits_unchanged(options):
    torch.manual_seed(0)
    config = FANformerConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, head_dim=16, ffn_dim=96,
                             **{"n_kv_heads": 2, **options})
    model = FANformer(config).eval()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        reference = model(ids)
        groups = [g for prefix in stages(model) for g in block_groups(model, prefix)]
        for group in groups:
            apply_scales(group, torch.rand(group.n_free) * 4 + 0.1)
        torch.testing.assert_close(model(ids), reference, atol=2e-5, rtol=1e-4)
    assert groups  # the LM head's norm is always a fold point


@pytest.mark.parametrize("options, lm_head", [(dict(mixer="fftnet"), True),
                                              (dict(head="fourier", fourier_frequencies=8), False)])
def test_other_mixers_and_heads_quantize(options, lm_head):
    """Blocks without ATF attention get the FFN fold points and clipping; the result runs."""
    torch.manual_seed(0)
    model = FANformer(FANformerConfig(vocab_size=96, d_model=64, n_layers=2, ffn_dim=96, **options)).eval()
    calibration = torch.randint(0, 96, (4, 32))
    config = AWQConfig(bits=4, group_size=32, calib_samples=4, calib_seq_len=32, lm_head=lm_head)
    with torch.no_grad():
        reference = model(calibration).log_softmax(-1)
        report = quantize(model, config, calibration, progress=False)
        out = model(calibration).log_softmax(-1)
    assert report["layers"] and torch.isfinite(out).all()
    assert (out.exp() * (out - reference)).sum(-1).mean() < 0.05  # KL stays small: a working model


def test_fold_points_follow_the_architecture():
    config = FANformerConfig(vocab_size=97, d_model=64, n_layers=2, norm="hybrid", fan_activation="identity")
    model = FANformer(config)
    names = [g.name for prefix in stages(model) for g in block_groups(model, prefix)]
    # Block 0 pre-norms attention; later HybridNorm blocks have no attention norm and a V norm;
    # the post-norm FFN input is also the residual, so neither ffn_norm is a fold point.
    assert names == ["blocks.0.attn_norm", "blocks.0.attn.fan.proj[G]", "blocks.0.attn.v_proj",
                     "blocks.0.ffn.up_proj", "blocks.1.attn.fan.proj[G]", "blocks.1.ffn.up_proj", "lm_head"]
    gelu = FANformer(FANformerConfig(vocab_size=97, d_model=64, n_layers=1, fan_activation="gelu"))
    assert not any("fan.proj" in g.name for g in block_groups(gelu, "blocks.0."))


def test_periodic_channels_keep_scale_one():
    torch.manual_seed(0)
    model = FANformer(FANformerConfig(vocab_size=97, d_model=64, n_layers=1, p=0.25))
    group = next(g for g in block_groups(model, "blocks.0.") if g.name.endswith("[G]"))
    proj = model.blocks[0].attn.fan.proj
    d_p = model.config.d_periodic
    before = proj.weight.detach().clone(), [r.weight.detach().clone() for r in group.readers]
    apply_scales(group, torch.full((group.n_free,), 2.0))
    assert torch.equal(proj.weight[:d_p], before[0][:d_p])  # P rows: untouched
    torch.testing.assert_close(proj.weight[d_p:], before[0][d_p:] / 2)  # G rows: divided
    for reader, weight in zip(group.readers, before[1]):
        torch.testing.assert_close(reader.weight[:, :2 * d_p], weight[:, :2 * d_p])  # cos, sin columns
        torch.testing.assert_close(reader.weight[:, 2 * d_p:], weight[:, 2 * d_p:] * 2)


def test_clip_search_matches_brute_force():
    torch.manual_seed(0)
    config = AWQConfig(bits=3, group_size=32, n_grid=10, max_shrink=0.5)
    w = torch.randn(4, 64)
    w[0, 3] = 6.0  # an outlier makes clipping worth it
    x = torch.randn(50, 64)
    clipped, _ = search_clip(w, x, config)

    def error(wg, xg, step):
        limit = wg.abs().max() * (1 - step / 10)
        q = pseudo_quantize(wg.clamp(-limit, limit)[None], AWQConfig(bits=3, group_size=-1))[0]
        return float((xg @ (q - wg)).pow(2).mean())

    for row, group in itertools.product(range(4), range(2)):
        cols = slice(32 * group, 32 * group + 32)
        wg, xg = w[row, cols], x[:, cols]
        best = min(range(5), key=lambda step: error(wg, xg, step))
        limit = wg.abs().max() * (1 - best / 10)
        torch.testing.assert_close(clipped[row, cols], wg.clamp(-limit, limit))


def test_search_improves_on_rtn_on_real_inputs(trained, corpus, cache_dir):
    """On the trained tiny model: every layer's output error after AWQ is no worse than
    after RTN on the same (scaled) inputs, and the scale search never loses to alpha = 0."""
    tokenizer = load_tokenizer(trained)
    calibration = calibration_tokens(tokenizer, [str(corpus)], 16, 64, cache_dir=cache_dir)
    model = load_model(trained)
    report = quantize(model, AWQConfig(bits=4, group_size=32, calib_samples=16, calib_seq_len=64), calibration,
                      progress=False)
    assert report["awq_scales"] and all(s["loss"] <= s["loss_alpha0"] for s in report["awq_scales"].values())
    assert any(s["alpha"] > 0 for s in report["awq_scales"].values())
    assert all(layer["metric"] == "awq_output_mse" and layer["error"] >= 0 for layer in report["layers"].values())

    rtn = load_model(trained)
    quantize(rtn, RTNConfig(bits=4, group_size=32), progress=False)
    ids = calibration[:4]
    float_model = load_model(trained)
    with torch.no_grad():
        reference = float_model(ids).log_softmax(-1)
        kl = {name: torch.nn.functional.kl_div(m(ids).log_softmax(-1), reference, log_target=True,
                                               reduction="batchmean").item() for name, m in (("awq", model), ("rtn", rtn))}
    assert kl["awq"] < kl["rtn"]


def test_group_output_error_is_the_unclipped_search_start():
    torch.manual_seed(1)
    config = AWQConfig(bits=4, group_size=32, max_shrink=0.0)  # one step: no shrinking at all
    w, x = torch.randn(8, 64), torch.randn(40, 64)
    clipped, error = search_clip(w, x, config)
    assert torch.equal(clipped, w)
    assert error == pytest.approx(group_output_error(w, pseudo_quantize(w, config), x, 32), rel=1e-5)
