"""docs/architecture.md states the presets: its table must say what the code builds."""

import re
from pathlib import Path

import torch

from fanformer.config import PRESETS, FANformerConfig
from fanformer.model import FANformer, count_parameters

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def preset_rows() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([\w-]+)` \|(.*)\|$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def test_every_preset_is_documented_with_its_exact_shape_and_count():
    rows = preset_rows()
    assert set(rows) == set(PRESETS)
    for name, (vocab, d, layers, heads, head_dim, ffn, seq, p, norm, cola, params) in rows.items():
        config = FANformerConfig.from_name(name)
        assert (int(vocab), int(d), int(layers), int(head_dim), int(ffn), int(seq), float(p), norm) == (
            config.vocab_size, config.d_model, config.n_layers, config.head_dim, config.ffn_dim,
            config.max_seq_len, config.p, config.norm), name
        assert heads == f"{config.n_heads} / {config.n_kv_heads}", name
        assert (cola == "off") == (config.cola_rank == 0), name
        with torch.device("meta"):
            assert int(params.replace(",", "")) == count_parameters(FANformer(config)), name
