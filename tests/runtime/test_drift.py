import math

import numpy as np
import pytest
import torch

from fanformer.errors import FANformerError
from fanformer.tokenizer import train_tokenizer
from fanformer.runtime.backend import load_backend
from fanformer.runtime.drift import drift, fp16_reference
from fanformer.runtime.torch_backend import TorchBackend

V = 40


@pytest.fixture(scope="module")
def tokens(tokenizer, texts):
    ids = np.array(tokenizer.encode("".join(texts[:6])).ids)
    rng = np.random.default_rng(0)  # plus random tokens, so the model is not only seeing its training text
    return np.concatenate([ids, rng.integers(3, tokenizer.get_vocab_size(), size=60)])


def test_a_model_against_itself(checkpoint, tokens):
    model = load_backend(checkpoint)
    for reference in (model, load_backend(checkpoint)):
        result = drift(model, reference, tokens, ctx=32, stride=16)
        assert result.kl_mean == pytest.approx(0, abs=1e-6) and result.kl_p99 == pytest.approx(0, abs=1e-6)
        assert result.top1_agreement == 1.0 and result.ppl_change == pytest.approx(0, abs=1e-9)
        assert result.tokens == result.model.tokens == len(tokens) - 1
        assert result.model.ppl == result.reference.ppl


def test_against_the_fp16_reference_the_drift_is_tiny(checkpoint, tokens):
    result = drift(load_backend(checkpoint), fp16_reference(checkpoint), tokens, ctx=32)
    assert 0 <= result.kl_mean < 1e-5 and 0 <= result.kl_p99 < 1e-4
    assert result.top1_agreement > 0.95 and abs(result.ppl_change) < 1e-3
    assert fp16_reference(checkpoint).info.dtype == "fp32 (fp16 weights)"  # fp32 compute on a CPU


def test_against_a_different_model(checkpoint, make_model, tokenizer, tokens):
    other = TorchBackend.from_model(make_model(seed=9), tokenizer)
    result = drift(load_backend(checkpoint), other, tokens, protocol="chunks", ctx=32)
    assert result.kl_mean > 0.01 and result.top1_agreement < 0.9
    assert result.tokens == (len(tokens) // 32) * 15
    assert result.ppl_change == pytest.approx(result.model.ppl / result.reference.ppl - 1)


def bigram_backend(fake_backend, tokenizer, table: torch.Tensor):
    """log P(next | previous token) from a fixed table (rows may hold -inf)."""
    return fake_backend(lambda prefix: table[prefix[-1]], V, tokenizer)


def test_kl_and_agreement_by_hand(fake_backend, tokenizer):
    g = torch.Generator().manual_seed(3)
    ref_table = torch.log_softmax(torch.randn(V, V, generator=g) * 2, -1)
    model_table = torch.log_softmax(ref_table + torch.randn(V, V, generator=g), -1)
    tokens = np.random.default_rng(5).integers(0, V, size=50)
    result = drift(bigram_backend(fake_backend, tokenizer, model_table),
                   bigram_backend(fake_backend, tokenizer, ref_table), tokens, ctx=8, stride=4)

    p, q = ref_table.double().exp().numpy(), model_table.double().exp().numpy()
    prev = tokens[:-1]  # every token after the first is scored, each predicted from the one before
    kl = np.array([sum(p[a, v] * (math.log(p[a, v]) - math.log(q[a, v])) for v in range(V)) for a in prev])
    assert result.tokens == len(kl)
    assert result.kl_mean == pytest.approx(kl.mean(), rel=1e-5)
    assert result.kl_stderr == pytest.approx(kl.std(ddof=1) / math.sqrt(len(kl)), rel=1e-4)
    assert result.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-5)
    assert result.top1_agreement == pytest.approx(np.mean(p[prev].argmax(1) == q[prev].argmax(1)))
    assert 0 < result.top1_agreement < 1  # the example exercises both outcomes
    nll = -np.log(q[prev, tokens[1:]])
    assert result.model.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_tokens_ruled_out_with_minus_infinity(fake_backend, tokenizer):
    """0 log 0 = 0: a token that both rule out adds nothing; one that only the model rules
    out costs p_ref * (log p_ref + 1e4), the clamp that keeps the sum finite."""
    probs = torch.tensor([0.5, 0.3, 0.2] + [0.0] * (V - 3))
    ref = probs.log().expand(V, V)
    tokens = np.random.default_rng(6).integers(0, 2, size=20)  # tokens both models allow
    result = drift(bigram_backend(fake_backend, tokenizer, ref), bigram_backend(fake_backend, tokenizer, ref),
                   tokens, ctx=8)
    assert result.kl_mean == 0.0 and result.top1_agreement == 1.0

    model = torch.tensor([0.625, 0.375] + [0.0] * (V - 2)).log().expand(V, V)  # token 2 ruled out
    result = drift(bigram_backend(fake_backend, tokenizer, model), bigram_backend(fake_backend, tokenizer, ref),
                   tokens, ctx=8)
    expected = 0.5 * math.log(0.5 / 0.625) + 0.3 * math.log(0.3 / 0.375) + 0.2 * (math.log(0.2) + 1e4)
    assert result.kl_mean == pytest.approx(expected, rel=1e-5)


def test_mismatched_vocabularies_are_user_errors(fake_backend, tokenizer, texts, checkpoint):
    table = torch.zeros(V, V)
    with pytest.raises(FANformerError, match="different tokenizers or vocabularies"):
        drift(bigram_backend(fake_backend, tokenizer, table), fake_backend(lambda p: torch.zeros(V + 1), V + 1,
                                                                              tokenizer), np.arange(20), ctx=8)
    other_tokenizer = train_tokenizer([t.upper() for t in texts], 400)
    with pytest.raises(FANformerError, match="different tokenizers or vocabularies"):
        drift(bigram_backend(fake_backend, tokenizer, table), bigram_backend(fake_backend, other_tokenizer, table),
              np.arange(20), ctx=8)
    model = load_backend(checkpoint)
    with pytest.raises(FANformerError, match="different tokenizers"):
        drift(model, TorchBackend.from_model(model.model, other_tokenizer), np.arange(20), ctx=8)


def test_ctx_beyond_either_model_is_a_user_error(fake_backend, tokenizer):
    short = fake_backend(lambda p: torch.zeros(V), V, tokenizer, max_seq_len=16)
    long = fake_backend(lambda p: torch.zeros(V), V, tokenizer, max_seq_len=64)
    for model, reference in ((short, long), (long, short)):
        with pytest.raises(FANformerError, match="longer than the model's maximum context 16"):
            drift(model, reference, np.arange(100), ctx=32)
