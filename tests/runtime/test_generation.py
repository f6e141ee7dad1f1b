import math

import pytest
import torch

from fanformer.errors import FANformerError
from fanformer.runtime.generation import (DEFAULT_MAX_NEW_TOKENS, GenerationConfig, apply_repetition_penalty, generate,
                                next_tokens, process_logits, reference_greedy, top_k_filter, top_p_filter)
from fanformer.runtime.torch_backend import TorchBackend

PROMPTS = ["def add(x, y):\n    return", "Fourier", "x = cos(3.14) + sin(π)"]  # 10, 1 and 14 tokens

MODEL_VARIANTS = {
    "pre-gqa": dict(),
    "hybrid-mha": dict(norm="hybrid", n_kv_heads=4),
    "cola-gated": dict(norm="hybrid", cola_rank=0.25, cola_lm_head=True, gated_residual=True, p=0.15),
    "plain-mqa-tied": dict(p=0.0, n_kv_heads=1, tie_embeddings=True),
}

EOS, A = 1, 3  # the char tokenizer: id 3 + i is the i-th letter


def letter(c: str) -> int:
    return A + ord(c) - ord("a")


def favour(*tokens_and_logits, vocab=29) -> torch.Tensor:
    logits = torch.zeros(vocab)
    for token, value in tokens_and_logits:
        logits[token] = value
    return logits


def successor(prefix):
    """The next letter of the alphabet (z -> a), far ahead of everything else."""
    return favour((A + (prefix[-1] - A + 1) % 26, 10.0))


@pytest.fixture
def letters(fake_backend, char_tokenizer):
    return fake_backend(successor, char_tokenizer.vocab_size, char_tokenizer)


# --- The cached loop against the uncached reference, on real models ----------------

@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_cached_greedy_equals_the_uncached_reference(make_model, tokenizer, variant):
    backend = TorchBackend.from_model(make_model(seed=1, **MODEL_VARIANTS[variant]), tokenizer)
    n = 20
    results = generate(backend, PROMPTS, GenerationConfig(max_new_tokens=n, temperature=0))
    for prompt, result in zip(PROMPTS, results):
        expected = reference_greedy(backend, tokenizer.encode(prompt).ids, n)
        assert result.token_ids == expected
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert result.finish_reason == ("length" if len(expected) == n else "eos")
    # A random-init model varies its greedy output, so the comparison above means something.
    assert len({t for r in results for t in r.token_ids}) > 5


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=40, top_p=0.9, seed=7)])
def test_a_batch_equals_its_prompts_one_by_one(make_model, tokenizer, sampling):
    backend = TorchBackend.from_model(make_model(seed=2), tokenizer)
    config = GenerationConfig(max_new_tokens=12, **sampling)
    batched = generate(backend, PROMPTS, config)
    assert len({len(tokenizer.encode(p).ids) for p in PROMPTS}) == len(PROMPTS)  # real left padding
    for prompt, result in zip(PROMPTS, batched):
        alone = generate(backend, [prompt], config)[0]
        assert (result.token_ids, result.text, result.finish_reason) == \
               (alone.token_ids, alone.text, alone.finish_reason)


def test_a_batch_equals_one_by_one_on_a_fake_backend_when_sampling(fake_backend, char_tokenizer):
    table = torch.randn(29, 29, generator=torch.Generator().manual_seed(0)) * 2
    backend = fake_backend(lambda prefix: table[prefix[-1]], 29, char_tokenizer)
    prompts = ["abc", "q", "hello"]
    config = GenerationConfig(max_new_tokens=15, temperature=1.3, seed=11)
    batched = generate(backend, prompts, config)
    assert batched == [generate(backend, [p], config)[0] for p in prompts]


def test_seeds_reproduce_and_differ(make_model, tokenizer):
    backend = TorchBackend.from_model(make_model(seed=4), tokenizer)
    hot = dict(max_new_tokens=16, temperature=2.0)
    first = generate(backend, PROMPTS[:1], GenerationConfig(seed=5, **hot))[0]
    assert generate(backend, PROMPTS[:1], GenerationConfig(seed=5, **hot))[0] == first
    assert generate(backend, PROMPTS[:1], GenerationConfig(seed=6, **hot))[0].token_ids != first.token_ids


def test_top_k_1_sampling_is_greedy(make_model, tokenizer):
    backend = TorchBackend.from_model(make_model(seed=5), tokenizer)
    greedy = generate(backend, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=0))
    sampled = generate(backend, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=3))
    assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


# --- Logit processors on crafted logits -----------------------------------------------

def survivors(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero()[:, 0].tolist())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.05]]).log()
    assert survivors(top_k_filter(logits, 1)) == {1}
    assert survivors(top_k_filter(logits, 2)) == {1, 3}
    assert survivors(top_k_filter(logits, 3)) == {1, 2, 3}
    assert survivors(top_k_filter(logits, 0)) == survivors(top_k_filter(logits, 9)) == {0, 1, 2, 3, 4}
    kept = top_k_filter(logits, 2)
    torch.testing.assert_close(kept[0, [1, 3]], logits[0, [1, 3]], atol=0, rtol=0)  # untouched


# Probabilities sorted: 0.5 (token 1), 0.25 (token 3), 0.15 (token 2), 0.1 (token 0);
# cumulative 0.5, 0.75, 0.9, 1.0 (0.5 and 0.75 are exact in binary).
@pytest.mark.parametrize("p, kept", [
    (1e-9, {1}),  # the top token is always kept
    (0.3, {1}),
    (0.5, {1}),  # token 1 alone reaches 0.5 exactly
    (0.5001, {1, 3}),
    (0.75, {1, 3}),  # reached exactly by two tokens
    (0.7501, {1, 3, 2}),
    (0.95, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    assert survivors(top_p_filter(logits, p)) == kept
    # The same with the vocabulary in another order: the filter follows probabilities, not positions.
    order = torch.tensor([2, 0, 3, 1])
    assert survivors(top_p_filter(logits[:, order], p)) == {int((order == k).nonzero()) for k in kept}


def test_top_p_filters_each_row_on_its_own():
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]).log()
    out = top_p_filter(logits, 0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0, 3.0]])
    seen = torch.tensor([[True, True, False, False, True, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0, 1.5]]
    assert apply_repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()


def test_min_length_suppresses_eos_only_in_short_rows():
    logits = torch.zeros(3, 5)
    seen = torch.zeros(3, 5, dtype=torch.bool)
    config = GenerationConfig(min_length=5, temperature=0)
    out = process_logits(logits, config, seen, torch.tensor([2, 5, 4]), eos_id=1)
    assert out[:, 1].tolist() == [-math.inf, 0.0, -math.inf]
    assert torch.equal(out[:, [0, 2, 3, 4]], logits[:, [0, 2, 3, 4]])
    assert logits.eq(0).all()  # the caller's logits are not modified in place


def test_top_k_comes_before_top_p_which_sees_the_renormalised_rest():
    """transformers' order: with 0.1 cut by top-k, 0.25 is 0.25/0.9 and 0.5 is 0.5/0.9 = 0.56 > 0.52,
    so top-p 0.52 keeps the top token alone (applied first, it would also keep 0.25)."""
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    seen = torch.zeros(1, 4, dtype=torch.bool)
    assert survivors(top_p_filter(logits, 0.52)) == {1, 3}
    sampled = process_logits(logits, GenerationConfig(top_k=3, top_p=0.52), seen, torch.tensor([1]), eos_id=9)
    assert survivors(sampled) == {1}
    greedy = process_logits(logits, GenerationConfig(temperature=0, top_k=1, top_p=0.1), seen,
                            torch.tensor([1]), eos_id=9)
    assert torch.equal(greedy, logits)  # greedy takes the argmax; filters cannot change it


@pytest.mark.parametrize("temperature, top_p, kept", [
    # softmax(log p / T) is p^(1/T) renormalised: the nucleus of the distribution sampled from.
    (2.0, 0.5, {1, 3}),  # (.166, .370, .203, .262): 0.37 < 0.5 so the runner-up stays
    (1.0, 0.5, {1}),
    (0.5, 0.72, {1}),  # (.029, .725, .065, .181): 0.725 >= 0.72 already
    (1.0, 0.72, {1, 3}),
])
def test_top_p_applies_to_the_tempered_distribution(temperature, top_p, kept):
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    probs = logits.exp() ** (1 / temperature)
    probs = probs / probs.sum()
    out = process_logits(logits, GenerationConfig(temperature=temperature, top_p=top_p),
                         torch.zeros(1, 4, dtype=torch.bool), torch.tensor([1]), eos_id=9)
    assert survivors(out) == kept
    # The draw is from the survivors' tempered probabilities, renormalised.
    torch.testing.assert_close(torch.softmax(out / temperature, -1)[0, list(kept)],
                               probs[0, list(kept)] / probs[0, list(kept)].sum())


def test_draws_only_come_from_surviving_tokens():
    logits = top_k_filter(torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0]]).log().repeat(200, 1), 2)
    draws = next_tokens(logits, 1.0, [torch.Generator().manual_seed(i) for i in range(200)])
    assert set(draws.tolist()) == {1, 3}
    assert next_tokens(logits, 0, []).tolist() == [1] * 200


# --- The loop, on a fake backend with predictable output -------------------------------

def test_the_fake_backend_continues_the_alphabet(letters):
    result = generate(letters, ["abc", "x"], GenerationConfig(max_new_tokens=5, temperature=0))
    assert [(r.text, r.finish_reason) for r in result] == [("defgh", "length"), ("yzabc", "length")]
    assert result[0].token_ids == [letter(c) for c in "defgh"]


def test_eos_ends_a_row_and_the_batch_goes_on(fake_backend, char_tokenizer):
    backend = fake_backend(lambda prefix: favour((EOS, 20.0)) if prefix[-1] == letter("e") else successor(prefix),
                           29, char_tokenizer)
    result = generate(backend, ["b", "m"], GenerationConfig(max_new_tokens=6, temperature=0))
    assert (result[0].text, result[0].token_ids, result[0].finish_reason) == ("cde", [5, 6, 7], "eos")
    assert (result[1].text, result[1].finish_reason) == ("nopqrs", "length")


def test_min_length_holds_eos_back_until_then(fake_backend, char_tokenizer):
    """The model wants EOS first and the next letter second; min_length counts the prompt."""
    backend = fake_backend(lambda prefix: favour((EOS, 20.0), (A + (prefix[-1] - A + 1) % 26, 10.0)),
                           29, char_tokenizer)
    assert generate(backend, ["ab"], GenerationConfig(temperature=0))[0].finish_reason == "eos"
    result = generate(backend, ["ab", "q"], GenerationConfig(min_length=5, temperature=0))
    assert [(r.text, r.finish_reason) for r in result] == [("cde", "eos"), ("rstu", "eos")]
    sampled = generate(backend, ["ab"], GenerationConfig(min_length=5, temperature=1.0, seed=1))[0]
    assert sampled.finish_reason == "eos" and len(sampled.token_ids) >= 3


def test_repetition_penalty_in_the_loop(fake_backend, char_tokenizer):
    """Logits prefer 'a' (4.0), then 'b' (3.0), then 'c' (1.0): a penalty of 2 on seen tokens
    takes 'a' to 2.0 and 'b' to 1.5, so after 'a' and 'b' are used 'a' wins again."""
    backend = fake_backend(lambda prefix: favour((letter("a"), 4.0), (letter("b"), 3.0), (letter("c"), 1.0)),
                           29, char_tokenizer)
    plain = generate(backend, ["z"], GenerationConfig(max_new_tokens=3, temperature=0))[0]
    assert plain.text == "aaa"
    penalised = generate(backend, ["z"], GenerationConfig(max_new_tokens=3, temperature=0,
                                                          repetition_penalty=2.0))[0]
    assert penalised.text == "aba"  # a: 4 -> 2 < b: 3; then b: 3 -> 1.5 < a: 2
    assert generate(backend, ["a"], GenerationConfig(max_new_tokens=1, temperature=0,
                                                     repetition_penalty=2.0))[0].text == "b"  # prompt counts


def collect(backend, prompts, config):
    deltas = {i: [] for i in range(len(prompts))}
    prefixes_ok = []

    def on_text(row, delta):
        deltas[row].append(delta)
        prefixes_ok.append((row, "".join(deltas[row])))

    results = generate(backend, prompts, config, on_text=on_text)
    for row, streamed in prefixes_ok:  # every moment: what was streamed is a prefix of the result
        assert results[row].text.startswith(streamed)
    return results, ["".join(deltas[i]) for i in range(len(prompts))]


def test_stop_strings_truncate_and_are_never_streamed(letters):
    results, streamed = collect(letters, ["a", "m", "w"], GenerationConfig(max_new_tokens=10, temperature=0,
                                                                           stop=("ef", "pqx", "zab")))
    assert [(r.text, r.finish_reason) for r in results] == [("bcd", "stop"), ("nopqrstuvw", "length"),
                                                            ("xy", "stop")]
    # "pq" was held back as a possible start of "pqx" and released when "r" came.
    assert streamed == [r.text for r in results]
    assert results[0].token_ids == [letter(c) for c in "bcdef"]  # the ids keep the tokens of the stop


def test_streaming_real_bpe_text_matches_the_final_text(make_model, tokenizer):
    """Random tokens split multi-byte characters (π, 🙂): nothing half-decoded is streamed."""
    backend = TorchBackend.from_model(make_model(seed=6), tokenizer)
    results, streamed = collect(backend, PROMPTS, GenerationConfig(max_new_tokens=30, temperature=3.0, seed=2))
    assert streamed == [r.text for r in results]
    assert any(r.text for r in results)


def test_length_budgets(fake_backend, char_tokenizer):
    backend = fake_backend(successor, 29, char_tokenizer, max_seq_len=512)

    def run(prompt, **config):
        result = generate(backend, [prompt], GenerationConfig(temperature=0, **config))[0]
        return result.text, result.finish_reason

    assert run("abc", max_length=7) == ("defg", "length")  # max_length counts the prompt
    assert run("abc", max_new_tokens=7) == ("defghij", "length")  # max_new_tokens does not
    assert run("abc", max_new_tokens=2, max_length=100) == ("de", "length")  # max_new_tokens wins
    text, reason = run("abc")
    assert (len(text), reason) == (DEFAULT_MAX_NEW_TOKENS, "length")
    with pytest.raises(FANformerError, match="leaves no room"):
        run("abc", max_length=3)


def test_the_models_context_ends_generation(fake_backend, char_tokenizer):
    backend = fake_backend(successor, 29, char_tokenizer, max_seq_len=8)
    result = generate(backend, ["abcdefg", "abcde"], GenerationConfig(max_new_tokens=10, temperature=0))
    assert [(r.text, r.finish_reason) for r in result] == [("h", "context"), ("fgh", "context")]
    with pytest.raises(FANformerError, match="8 tokens.*context is 8"):
        generate(backend, ["abcdefgh"], GenerationConfig(temperature=0))


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(max_length=0), dict(min_length=-1),
                                 dict(repetition_penalty=0.0), dict(stop=("",))])
def test_bad_generation_configs_are_user_errors(bad):
    with pytest.raises(FANformerError):
        GenerationConfig(**bad)


def test_bad_prompts_are_user_errors(letters):
    with pytest.raises(FANformerError, match="empty prompt"):
        generate(letters, ["abc", ""], GenerationConfig())
    with pytest.raises(FANformerError, match="no prompt"):
        generate(letters, [], GenerationConfig())
    with pytest.raises(FANformerError, match="context is 64"):
        generate(letters, ["a" * 64], GenerationConfig())
