"""Tests for runtime/onnx_backend.py through the runtime interface: the ONNX cache agrees
with scoring from scratch, batching does not change what is generated, and the CLI's
`generate` and `eval` run an exported folder with PyTorch's results."""

import json
from pathlib import Path

import pytest
import torch

from fanformer.cli import main
from fanformer.pipeline import train_run
from fanformer.runtime import GenerationConfig, eval_tokens, generate, load_backend, perplexity

PROMPTS = ["def ", "import json\n", "class Parser(object):\n    def "]


@pytest.fixture(scope="module")
def trained(corpus, cache_dir, tmp_path_factory) -> Path:
    """A briefly trained tiny checkpoint (varied greedy output, confident top-1)."""
    out = tmp_path_factory.mktemp("onnx-backend") / "ckpt"
    train_run(out, data=[str(corpus)], model_overrides=dict(vocab_size=400, max_seq_len=64),
              train_overrides=dict(max_steps=250, batch_size=8, seq_len=64, eval_every=0, save_every=0,
                                   log_every=50, warmup_steps=10, lr=3e-3, eval_batches=1),
              cache_dir=cache_dir, progress=False)
    return out


@pytest.fixture(scope="module")
def folder(trained) -> Path:
    out = trained.with_name("onnx")
    assert main(["export", str(trained), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_threads_reach_onnxruntime(folder):
    assert load_backend(folder, threads=1).session.get_session_options().intra_op_num_threads == 1


def test_detected_and_described(backend, folder):
    assert backend.info.format == "onnx" and backend.info.dtype == "fp32" and backend.info.device == "cpu"
    assert (backend.info.vocab_size, backend.info.max_seq_len) == (400, 64)
    assert load_backend(folder / "model.onnx").info.format == "onnx"  # the file itself works too


@pytest.fixture(params=[0, 5], ids=["preallocated", "growing"])
def backend(request, folder, monkeypatch):
    """The fused graph's in-place KV buffer, first allocated whole (the context is under
    FIRST_CAPACITY here) and, with a first capacity of 5, reallocated as sequences grow."""
    from fanformer.runtime import onnx_backend

    if request.param:
        monkeypatch.setattr(onnx_backend, "FIRST_CAPACITY", request.param)
    loaded = load_backend(folder, device="cpu")
    assert loaded.fused
    return loaded


def test_cached_decode_equals_uncached_score(backend):
    text = "def parse(self, text):\n    return self.decoder.decode(text)\n"
    ids = torch.tensor([backend.tokenizer.encode(text).ids[:20], backend.tokenizer.encode(text[7:]).ids[:20]])
    assert ids.shape == (2, 20)
    expected = backend.score(ids)  # no cache: every position from scratch

    cache = backend.new_cache(2)
    mask = lambda n: torch.ones((2, n), dtype=torch.long)  # noqa: E731
    got = [backend.prefill(cache, ids[:, :8], mask(8)),
           backend.forward(ids[:, 8:12], mask(12), cache)]  # several tokens on top of a cache
    got += [backend.decode(cache, ids[:, t:t + 1], mask(t + 1)) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-5, rtol=1e-5)
    # Scoring from scratch kept nothing, so it may be repeated with the same result.
    torch.testing.assert_close(backend.score(ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=24, temperature=0),
                                    GenerationConfig(max_new_tokens=24, temperature=0.8, top_k=40, seed=3)],
                         ids=["greedy", "sampled"])
def test_batch_generation_equals_one_by_one(backend, config):
    batched = generate(backend, PROMPTS, config)
    alone = [generate(backend, [p], config)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert len({t for g in batched for t in g.token_ids}) >= 6  # not one token over and over


def test_generate_cli_prints_pytorch_greedy_text(capsys, folder, trained):
    assert main(["generate", str(folder), "--prompt", "def f(", "--greedy", "--max-new-tokens", "24",
                 "--device", "cpu", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    expected = generate(load_backend(trained), ["def f("], GenerationConfig(max_new_tokens=24, temperature=0))
    assert printed == "def f(" + expected[0].text + "\n"
    assert len(expected[0].token_ids) > 5


def test_eval_cli_against_the_fp16_reference(capsys, corpus, folder, trained):
    flags = ["--data", str(corpus), "--split", "all", "--ctx", "64", "--max-tokens", "2000", "--quiet",
             "--device", "cpu"]
    assert main(["eval", str(folder), *flags, "--json", "--reference", str(trained)]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["model_info"]["format"] == "onnx"
    assert "fp16" in reported["reference_info"]["dtype"]
    assert reported["kl_mean"] < 1e-4 and reported["top1_agreement"] > 0.99

    pytorch = load_backend(trained)
    tokens = eval_tokens(pytorch.tokenizer, [str(corpus)], "all", 2000)
    expected = perplexity(pytorch, tokens, ctx=64)
    assert reported["model"]["tokens"] == expected.tokens
    assert reported["model"]["ppl"] == pytest.approx(expected.ppl, rel=1e-4)

    assert main(["eval", str(folder), *flags]) == 0
    text = capsys.readouterr().out
    assert f"scored {expected.tokens:,} tokens" in text and "(onnx, fp32, cpu)" in text
