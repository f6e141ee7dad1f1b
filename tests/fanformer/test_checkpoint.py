import json

import pytest
import torch

import fanformer.hf  # noqa: F401  (registers the Auto classes)
from fanformer.checkpoint import WEIGHTS_FILE, load_model, save_checkpoint
from fanformer.outputs import write_directory_atomically
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20

VARIANTS = {
    "pre-untied": dict(),
    "hybrid-tied": dict(norm="hybrid", tie_embeddings=True),
    "seed-like": dict(norm="hybrid", cola_rank=0.25, cola_lm_head=True, gated_residual=True, p=0.15),
    "plain": dict(p=0.0),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


def make_checkpoint(path, tokenizer, **overrides):
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", vocab_size=400, **overrides)).eval()
    save_checkpoint(path, model, tokenizer)
    return model


def greedy_reference(model, ids, n):
    """Uncached greedy decoding: recompute the whole sequence every step."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_through_our_loader_and_transformers(tmp_path, tokenizer, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_checkpoint(tmp_path / "ckpt", tokenizer, **VARIANTS[variant])
    x = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(x), expected, atol=0, rtol=0)
        hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
        torch.testing.assert_close(hf_model(x).logits, expected, atol=0, rtol=0)
        generated = hf_model.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
    torch.testing.assert_close(generated, greedy_reference(model, x[:1], 8))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert hf_tok(TEXTS[1])["input_ids"] == tokenizer.encode(TEXTS[1]).ids
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)


def test_directory_layout_and_no_pickle(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "ckpt", tokenizer, tie_embeddings=True)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "fanformer" and config["tie_word_embeddings"] is True
    assert FANformerConfig.from_dict(config) == FANformerConfig.from_name("tiny", vocab_size=400, tie_embeddings=True)
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 1 and generation["top_p"] == 0.85


def test_corrupted_and_truncated_weights_are_user_errors(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "ckpt", tokenizer)
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(FANformerError, match="corrupted or truncated"):
        load_model(tmp_path / "ckpt")
    weights.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(FANformerError, match="corrupted or truncated"):
        load_model(tmp_path / "ckpt")


def test_weights_that_do_not_match_the_config(tmp_path, tokenizer):
    make_checkpoint(tmp_path / "ckpt", tokenizer)
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "ffn_dim": 256}))
    with pytest.raises(FANformerError, match="shape"):
        load_model(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(FANformerError, match="n_layers is 3, but the weights file holds blocks 0..1"):
        load_model(tmp_path / "ckpt")


def test_missing_files_and_paths(tmp_path, tokenizer):
    with pytest.raises(FANformerError, match="does not exist"):
        load_model(tmp_path / "nope")
    make_checkpoint(tmp_path / "ckpt", tokenizer)
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(FANformerError, match="missing config.json"):
        load_model(tmp_path / "ckpt")


def test_atomic_write_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    write_directory_atomically(out, lambda d: (d / "a.txt").write_text("old"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_directory_atomically(out, crash)
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind
    write_directory_atomically(out, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["b.txt"]


def test_transformers_batched_generate_with_left_padding(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_checkpoint(tmp_path / "ckpt", tokenizer, norm="hybrid")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt", padding_side="left")
    prompts = ["def add(a, b):", "π"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(**hf_tok([prompt], return_tensors="pt"), max_new_tokens=6, do_sample=False)
        assert together[row].tolist() == alone[0, -6:].tolist()
