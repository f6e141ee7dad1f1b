import math

import pytest

from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError


def test_json_round_trip_every_preset():
    for name in PRESETS:
        config = FANformerConfig.from_name(name)
        assert FANformerConfig.from_json(config.to_json()) == config


def test_from_dict_ignores_transformers_bookkeeping():
    data = {**FANformerConfig().to_dict(), "model_type": "fanformer", "transformers_version": "5"}
    assert FANformerConfig.from_dict(data) == FANformerConfig()


def test_overrides_apply_on_top_of_preset():
    config = FANformerConfig.from_name("small", p=0.0, n_layers=3, norm="hybrid")
    assert (config.p, config.n_layers, config.norm, config.d_model) == (0.0, 3, "hybrid", 256)


@pytest.mark.parametrize("d_model,p", [(64, 0.25), (768, 0.15), (100, 0.3), (64, 0.0)])
def test_fan_widths(d_model, p):
    config = FANformerConfig(d_model=d_model, p=p)
    assert config.d_periodic == math.floor(d_model * p)
    assert 2 * config.d_periodic + config.d_plain == d_model
    assert config.has_fan == (p * d_model >= 1)


def test_cola_rank_is_a_fraction_of_input_width():
    assert FANformerConfig(cola_rank=0.25).cola_rank_for(768) == 192
    assert FANformerConfig(cola_rank=0.0).cola_rank_for(768) == 0


@pytest.mark.parametrize("bad,needle", [
    (dict(n_heads=4, n_kv_heads=3), "divisible"),
    (dict(p=0.5), "p must be in [0, 0.5)"),
    (dict(p=-0.1), "p must be in [0, 0.5)"),
    (dict(norm="post"), "norm must be one of"),
    (dict(fan_activation="relu"), "fan_activation"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(cola_rank=1.5), "cola_rank"),
    (dict(cola_lm_head=True), "cola_lm_head needs cola_rank"),
    (dict(tie_embeddings=True, cola_rank=0.25, cola_lm_head=True), "tie_embeddings"),
    (dict(dropout=1.0), "dropout"),
    (dict(rope_theta=10**30), "rope_theta must be in (0, 1e+12]"),  # a damaged config.json's (found by fuzzing)
    (dict(norm_eps=10**30), "norm_eps must be in (0, 1)"),
    (dict(norm_eps=0.0), "norm_eps must be in (0, 1)"),
])
def test_invalid_values_raise_one_clear_error(bad, needle):
    with pytest.raises(FANformerError, match="invalid model config") as err:
        FANformerConfig(**bad)
    assert needle in str(err.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(FANformerError, match="tiny, small"):
        FANformerConfig.from_name("gpt-5")


def test_bad_json_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FANformerError, match="not valid JSON"):
        FANformerConfig.from_file(tmp_path)
