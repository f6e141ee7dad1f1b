import json
import math

import numpy as np
import pytest
import torch

from fanformer.data import split_of
from fanformer.errors import FANformerError
from fanformer.tokenizer import special_token_ids
from fanformer.runtime.perplexity import (Window, chunk_windows, eval_tokens, make_windows, perplexity, sliding_windows,
                                summarize_nll)
from fanformer.runtime.torch_backend import TorchBackend

V = 50


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(3, V, size=40)


# --- Windows --------------------------------------------------------------------------

def test_sliding_windows_by_hand():
    assert sliding_windows(10, ctx=4, stride=2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6),
                                                    Window(6, 10, 8)]
    assert sliding_windows(10, ctx=4, stride=3) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 10, 7)]
    assert sliding_windows(3, ctx=4, stride=2) == [Window(0, 3, 1)]
    assert sliding_windows(2, ctx=8, stride=4) == [Window(0, 2, 1)]


def test_chunk_windows_by_hand():
    # Chunks [0, 4) and [4, 8); the 2 tokens left over make no chunk. Only the second half of
    # each chunk, minus its first token, is scored: logits from position ctx/2 on.
    assert chunk_windows(10, ctx=4) == [Window(0, 4, 3), Window(4, 8, 7)]
    assert chunk_windows(16, ctx=8) == [Window(0, 8, 5), Window(8, 16, 13)]
    assert chunk_windows(7, ctx=8) == []


@pytest.mark.parametrize("n, ctx, stride", [(10, 4, 2), (10, 4, 3), (11, 4, 3), (11, 2, 1), (100, 16, 5), (5, 16, 8),
                                            (64, 8, 1), (33, 32, 16), (40, 40, 39)])
def test_sliding_windows_score_every_token_after_the_first_once(n, ctx, stride):
    windows = sliding_windows(n, ctx, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert 0 <= w.begin < w.first <= w.end <= n and w.end - w.begin <= ctx
        assert w.first - w.begin >= min(ctx - stride, w.first)  # context kept from the previous window


def test_bad_window_settings_are_user_errors():
    with pytest.raises(FANformerError, match="stride"):
        make_windows(100, "sliding", ctx=4, stride=5)
    with pytest.raises(FANformerError, match="stride"):  # the token at each window's start would be skipped
        make_windows(100, "sliding", ctx=4, stride=4)
    with pytest.raises(FANformerError, match="stride"):
        make_windows(100, "sliding", ctx=4, stride=-1)
    with pytest.raises(FANformerError, match="at least 2"):
        make_windows(100, "chunks", ctx=1, stride=None)
    with pytest.raises(FANformerError, match="unknown protocol 'rolling'"):
        make_windows(100, "rolling", ctx=4, stride=2)
    with pytest.raises(FANformerError, match="too few"):
        make_windows(1, "sliding", ctx=4, stride=2)
    with pytest.raises(FANformerError, match="too few"):
        make_windows(7, "chunks", ctx=8, stride=None)


# --- Perplexity on fake backends ------------------------------------------------------

@pytest.mark.parametrize("protocol", ["sliding", "chunks"])
def test_uniform_logits_give_the_vocabulary_size(fake_backend, tokens, protocol):
    backend = fake_backend(lambda prefix: torch.zeros(V), V)
    result = perplexity(backend, tokens, protocol=protocol, ctx=8, stride=4)
    assert result.ppl == pytest.approx(V, rel=1e-6)
    assert result.nll == pytest.approx(math.log(V), rel=1e-6)
    assert result.ppl_stderr == pytest.approx(0, abs=1e-6)  # every token costs the same
    assert result.tokens == {"sliding": len(tokens) - 1, "chunks": 5 * 3}[protocol]


def test_perplexity_of_known_next_token_probabilities(fake_backend, tokens):
    """P(next | previous token) is a fixed table, so the window layout cannot matter and
    perplexity is exp(mean -log P[t[i-1], t[i]]) over every scored i."""
    table = torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    backend = fake_backend(lambda prefix: table[prefix[-1]].log(), V)
    log_p = np.log(table.double().numpy())
    nll = np.array([-log_p[tokens[i - 1], tokens[i]] for i in range(1, len(tokens))])
    for ctx, stride, batch_size in [(8, 4, 4), (8, 3, 1), (40, 39, 2), (5, 1, 3)]:
        result = perplexity(backend, tokens, "sliding", ctx=ctx, stride=stride, batch_size=batch_size)
        assert result.tokens == len(nll)
        assert result.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    chunk_nll = nll[[3 - 1, 7 - 1, 11 - 1]]  # ctx 4 over 12 tokens scores tokens 3, 7 and 11
    result = perplexity(backend, tokens[:12], "chunks", ctx=4, batch_size=2)
    assert result.tokens == 3 and result.ppl == pytest.approx(math.exp(chunk_nll.mean()), rel=1e-5)


def test_how_much_context_each_scored_token_sees(fake_backend):
    """Logits at position j of a window make token 0 e^j times likelier than each other token,
    so scoring token t != 0 costs log(e^j + V - 1): the cost reveals the context j = t - 1 - begin."""
    backend = fake_backend(lambda prefix: torch.zeros(V).index_fill_(0, torch.tensor([0]), len(prefix) - 1), V)
    tokens = np.arange(10) + 3

    def expected(contexts):
        return math.exp(np.mean([math.log(math.exp(j) + V - 1) for j in contexts]))

    # Windows (0,4,1) (2,6,4) (4,8,6) (6,10,8): tokens 1-3 at j = 0, 1, 2, then two per window at j = 1, 2.
    result = perplexity(backend, tokens, "sliding", ctx=4, stride=2)
    assert result.ppl == pytest.approx(expected([0, 1, 2, 1, 2, 1, 2, 1, 2]), rel=1e-6)
    # Chunks [0, 4) and [4, 8): tokens 3 and 7, each after 2 tokens of its chunk.
    result = perplexity(backend, tokens, "chunks", ctx=4)
    assert result.ppl == pytest.approx(expected([2, 2]), rel=1e-6)


def test_stderr_is_llama_cpps_formula():
    nll = np.random.default_rng(2).gamma(2.0, 1.5, size=300).astype(np.float32)
    x = nll.astype(np.float64)
    ppl = math.exp(x.mean())
    result = summarize_nll(nll, "sliding", 16, 8)
    assert result.ppl == pytest.approx(ppl, rel=1e-6)
    # ppl * sqrt(var / (n - 1)) with the population variance == ppl * sample std / sqrt(n).
    assert result.ppl_stderr == pytest.approx(ppl * np.std(x, ddof=1) / math.sqrt(len(x)), rel=1e-6)
    assert (result.tokens, result.protocol, result.ctx, result.stride) == (300, "sliding", 16, 8)
    assert summarize_nll(nll, "chunks", 16, 8).stride is None


def test_stderr_of_nearly_constant_losses():
    """Tiny spread around a large mean: a variance from E[x^2] - mean^2 with a float32 mean
    would be all rounding error."""
    nll = (7.0 + np.random.default_rng(3).normal(0, 1e-4, size=2000)).astype(np.float32)
    x = nll.astype(np.float64)
    result = summarize_nll(nll, "sliding", 16, 8)
    assert result.ppl_stderr == pytest.approx(math.exp(x.mean()) * np.std(x, ddof=1) / math.sqrt(len(x)),
                                              rel=1e-3)
    assert math.isnan(summarize_nll(nll[:1], "sliding", 16, 8).ppl_stderr)


def test_ctx_longer_than_the_model_is_a_user_error(fake_backend, tokens):
    backend = fake_backend(lambda prefix: torch.zeros(V), V, max_seq_len=16)
    with pytest.raises(FANformerError, match="--ctx 32 is longer than the model's maximum context 16"):
        perplexity(backend, tokens, ctx=32)
    with pytest.raises(FANformerError, match="too few"):
        perplexity(backend, tokens[:1], ctx=16)
    with pytest.raises(FANformerError, match="stride"):
        perplexity(backend, tokens, ctx=8, stride=9)


def test_a_real_model_batched_or_not(make_model, tokenizer):
    backend = TorchBackend.from_model(make_model(seed=1), tokenizer)
    tokens = np.random.default_rng(4).integers(3, tokenizer.get_vocab_size(), size=100)
    one = perplexity(backend, tokens, ctx=32, stride=16, batch_size=1)
    many = perplexity(backend, tokens, ctx=32, stride=16, batch_size=8)
    assert one.tokens == many.tokens == 99
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)
    # Full-context windows: the mean NLL of a single uncached forward over all 100 tokens.
    whole = perplexity(backend, tokens, ctx=100, stride=99)
    logits = backend.score(torch.from_numpy(tokens)[None])[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(tokens[1:]))
    assert whole.nll == pytest.approx(float(nll), rel=1e-5)


# --- Evaluation tokens ----------------------------------------------------------------

def corpus_documents(corpus):
    lines = (corpus / "code.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def test_split_all_is_every_document_followed_by_eos(corpus, tokenizer):
    eos = special_token_ids(tokenizer)["eos_token_id"]
    expected = [t for doc in corpus_documents(corpus) for t in tokenizer.encode(doc).ids + [eos]]
    tokens = eval_tokens(tokenizer, [str(corpus)], split="all")
    assert tokens.tolist() == expected
    assert eval_tokens(tokenizer, [str(corpus)], split="all", max_tokens=100).tolist() == expected[:100]


def test_a_held_out_split_is_its_documents_followed_by_eos(corpus, tokenizer, cache_dir):
    eos = special_token_ids(tokenizer)["eos_token_id"]
    expected = [t for doc in corpus_documents(corpus) if split_of(doc) == "val"
                for t in tokenizer.encode(doc).ids + [eos]]
    assert len(expected) > 0
    assert eval_tokens(tokenizer, [str(corpus)], split="val", cache_dir=cache_dir).tolist() == expected


def test_an_empty_split_or_an_unknown_one_is_a_user_error(tmp_path, tokenizer, cache_dir):
    train_docs = [d for d in (f"x = {i}\n" for i in range(100)) if split_of(d) == "train"][:5]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in train_docs))
    with pytest.raises(FANformerError, match="the test split of this corpus is empty"):
        eval_tokens(tokenizer, [str(tmp_path / "tiny.jsonl")], split="test", cache_dir=cache_dir)
    assert len(eval_tokens(tokenizer, [str(tmp_path / "tiny.jsonl")], split="all")) > 0
    with pytest.raises(FANformerError, match="unknown split 'dev'"):
        eval_tokens(tokenizer, [str(tmp_path / "tiny.jsonl")], split="dev")
