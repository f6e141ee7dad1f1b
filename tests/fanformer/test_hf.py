"""transformers integration: `generate` and hand-written cache loops against uncached references.

The references are independent of transformers' cache: the plain `FANformer` forward over the
whole sequence, recomputed every step. Models run in float64 so that greedy choices cannot
flip on rounding between the cached and uncached paths.
"""

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

import fanformer.hf  # noqa: F401  (registers the Auto classes)
from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14\n"] * 20
VOCAB = 400
PAD, EOS = 2, 1

OPTIONS = {
    "fan-pre": dict(),
    "plain-p0": dict(p=0.0),
    "hybrid": dict(norm="hybrid"),
    "cola": dict(cola_rank=0.25, cola_lm_head=True),
    "gated": dict(gated_residual=True),
    "gqa": dict(n_kv_heads=1),
    "tied": dict(tie_embeddings=True),
    "seed-like": dict(norm="hybrid", cola_rank=0.25, gated_residual=True, n_kv_heads=1, tie_embeddings=True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, VOCAB)


def hf_model(path, tokenizer, **overrides):
    """A checkpoint written by our code, loaded back through transformers' Auto class (float64)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    save_checkpoint(path, FANformer(FANformerConfig.from_name("tiny", vocab_size=VOCAB, **overrides)), tokenizer)
    return AutoModelForCausalLM.from_pretrained(path).double().eval()


def greedy_reference(model: FANformer, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Uncached greedy decoding: the whole sequence recomputed every step."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@contextmanager
def no_warnings():
    """Fail on any Python warning or any transformers log record at WARNING or above."""
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    hf_logging.warning_once.cache_clear()  # a warning emitted earlier in the session must show again
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        root.removeHandler(handler)
    # Older transformers (5.0) note that a greedy call leaves the checkpoint's sampling defaults unused;
    # it says the same of any checkpoint that ships sampling defaults (Llama's do), so it is not ours.
    ours = [r.getMessage() for r in records if "generation flags are not valid" not in r.getMessage()]
    assert not ours, ours


@pytest.mark.parametrize("option", list(OPTIONS))
def test_generate_equals_uncached_greedy(tmp_path, tokenizer, option):
    model = hf_model(tmp_path / "ckpt", tokenizer, **OPTIONS[option])
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad(), no_warnings():
        generated = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None)
        expected = greedy_reference(model.model, ids, 24)
    assert generated.tolist() == expected.tolist()


@pytest.mark.parametrize("option", ["fan-pre", "seed-like"])
def test_manual_cache_loop_equals_full_forward(tmp_path, tokenizer, option):
    """The loop transformers documents: feed the returned cache back with one new token at a time."""
    model = hf_model(tmp_path / "ckpt", tokenizer, **OPTIONS[option])
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad(), no_warnings():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        cache = getattr(out, _cache_argument())
        assert cache is not None and cache.get_seq_length() == 5
        steps = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], **{_cache_argument(): cache}, use_cache=True)
            steps.append(out.logits)
        assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def _cache_argument() -> str:
    from fanformer.hf import CACHE_FIELD

    return CACHE_FIELD


def test_use_cache_false_returns_no_cache(tmp_path, tokenizer):
    from fanformer.hf import CACHE_FIELD

    model = hf_model(tmp_path / "ckpt", tokenizer)
    with torch.no_grad():
        out = model(torch.randint(3, VOCAB, (1, 4)), use_cache=False)
    assert getattr(out, CACHE_FIELD) is None


def test_sampling_with_cache_equals_sampling_without(tmp_path, tokenizer):
    """Same seed, same draws: the cached run must see the same distributions as the uncached one."""
    model = hf_model(tmp_path / "ckpt", tokenizer, **OPTIONS["seed-like"])
    ids = torch.randint(3, VOCAB, (2, 6))
    runs = []
    with torch.no_grad(), no_warnings():
        for use_cache in (True, False):
            torch.manual_seed(11)
            runs.append(model.generate(ids, max_new_tokens=16, do_sample=True, temperature=1.3, top_k=0,
                                       top_p=1.0, use_cache=use_cache, pad_token_id=PAD, eos_token_id=None))
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].shape == (2, 22)


def test_min_new_tokens_and_eos(tmp_path, tokenizer):
    model = hf_model(tmp_path / "ckpt", tokenizer)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        free = greedy_reference(model.model, ids, 10)[0, 5:].tolist()
        # The token greedy picks first becomes the EOS: generation stops right after it ...
        stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=free[0], pad_token_id=PAD)
        assert stopped[0, 5:].tolist() == free[:1]
        # ... unless min_new_tokens forbids EOS: then it is masked out for that many tokens.
        held = model.generate(ids, max_new_tokens=10, min_new_tokens=4, do_sample=False, eos_token_id=free[0],
                              pad_token_id=PAD)[0, 5:].tolist()
    assert len(held) >= 4 and free[0] not in held[:4]
    if free[0] in held:  # after min_new_tokens it may stop again, on that token
        assert held.index(free[0]) == len(held) - 1


def test_left_padded_batch_equals_one_by_one(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model = hf_model(tmp_path / "ckpt", tokenizer, **OPTIONS["seed-like"])
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt", padding_side="left")
    prompts = ["def add(a, b):", "π", "Fourier features: cos"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad(), no_warnings():
        together = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None)[:, -8:]
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer.encode(prompt).ids])
            assert together[row].tolist() == greedy_reference(model.model, ids, 8)[0, -8:].tolist()


def test_checkpoint_generation_config_sets_no_length(tmp_path, tokenizer):
    """generation_config.json leaves lengths to the caller: `max_new_tokens` alone warns about nothing."""
    model = hf_model(tmp_path / "ckpt", tokenizer)
    assert model.generation_config.max_length in (None, 20)  # transformers' own default, not ours
    with torch.no_grad(), no_warnings():
        model.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2)
