"""The onnxruntime-genai backend against the onnxruntime one on the same exported folder:
the same graph, so the same logits, whether scored whole or decoded token by token."""

import pytest
import torch

from fanformer.export import export
from fanformer.errors import FANformerError
from fanformer.runtime import GenerationConfig, generate, load_backend, reference_greedy
from fanformer.runtime.validation import validate_onnx

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def folder(checkpoint):
    return export(checkpoint, "onnx", checkpoint.with_name("genai-onnx"), validate=validate_onnx)


@pytest.fixture(scope="module")
def genai(folder):
    return load_backend(folder, format="genai")


def test_scores_match_onnxruntime(genai, folder):
    ids = torch.randint(3, genai.info.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = load_backend(folder).score(ids)
    torch.testing.assert_close(genai.score(ids), expected, atol=1e-4, rtol=1e-4)


def test_cached_decode_matches_scoring(genai):
    ids = torch.randint(3, genai.info.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = genai.new_cache(1)
    steps = [genai.prefill(cache, ids[:, :8], torch.ones(1, 8, dtype=torch.long))]
    for t in range(8, 12):
        steps.append(genai.decode(cache, ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long)))
    torch.testing.assert_close(torch.cat(steps, dim=1), genai.score(ids), atol=1e-4, rtol=1e-4)


def test_generation_runs_through_it(genai, folder):
    prompt = "def add"
    out = generate(genai, [prompt], GenerationConfig(max_new_tokens=10, temperature=0))[0]
    assert out.token_ids == reference_greedy(load_backend(folder), genai.tokenizer.encode(prompt).ids, 10)


def test_what_it_cannot_do_is_a_clear_error(genai, folder, tmp_path):
    with pytest.raises(FANformerError, match="batch size 1"):
        genai.new_cache(2)
    with pytest.raises(FANformerError, match="unpadded"):
        genai.forward(torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]), genai.new_cache(1))
    with pytest.raises(FANformerError, match="no genai_config.json"):
        load_backend(tmp_path, format="genai")
    with pytest.raises(FANformerError, match="drop --dtype"):
        load_backend(folder, format="genai", dtype="fp16")
