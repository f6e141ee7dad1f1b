"""Shared fixtures: a small real corpus, a per-session token cache, one CPU thread, a
tiny model overfit on two short texts."""

import json
from pathlib import Path

import pytest
import torch

from fanformer.config import FANformerConfig
from fanformer.data import split_of
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer

# Stdlib modules present in every supported Python: real source text, ~250 KB.
CORPUS_MODULES = ("textwrap.py", "argparse.py", "dataclasses.py", "functools.py",
                  "json/__init__.py", "json/decoder.py", "json/encoder.py")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Stdlib source cut into 40-line documents (one .jsonl), enough for a val split."""
    stdlib = Path(json.__file__).parent.parent
    docs = []
    for name in CORPUS_MODULES:
        lines = (stdlib / name).read_text(encoding="utf-8").splitlines(keepends=True)
        docs += ["".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    docs = [d for d in docs if d.strip()]
    assert any(split_of(d) == "val" for d in docs), "corpus needs held-out documents for val_loss"
    root = tmp_path_factory.mktemp("corpus")
    (root / "code.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session: the corpus tokenizer is trained once and reused;
    nothing touches ~/.cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, cache_dir):
    monkeypatch.setenv("FANFORMER_CACHE", str(cache_dir))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Test models are tiny; a second OpenMP thread gains nothing and, on a busy
    2-core machine, spin-waits runs many times slower. The GGUF backend's ggml engine
    (default: one thread per physical core) gets one thread too."""
    from fanformer.runtime.gguf_backend import ggml_missing

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        if ggml_missing() is None:
            patch.setattr("fanformer.runtime.ggml_engine.physical_cores", lambda: 1)
        yield
    torch.set_num_threads(threads)


OVERFIT_TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20


def overfit(**options):
    """(model, tokenizer, ids): a `tiny` model with config `options`, overfit on OVERFIT_TEXTS.

    Forty steps take its loss near 0.01, so next-token distributions are peaked as a real
    model's are; random-init logits are so flat that any rounding flips their argmax, which
    would make agreement checks of quantized or other-engine runs meaningless."""
    tokenizer = train_tokenizer(OVERFIT_TEXTS, 400)
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size(), **options))
    ids = torch.tensor(tokenizer.encode("".join(OVERFIT_TEXTS[:8])).ids[:65])[None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, ids


@pytest.fixture(scope="session")
def train_overfit():
    """`overfit`, for tests that need their own model options."""
    return overfit


@pytest.fixture
def cli_fails(capsys):
    """Run the CLI in-process and check it failed as a user's mistake should: exit 2,
    exactly one `fanformer CMD: error:` line naming every fragment, no traceback."""
    from fanformer.cli import main

    def check(argv, *fragments) -> str:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith(f"fanformer {argv[0]}: error: "), err
        for fragment in fragments:
            assert fragment in errors[0], errors[0]
        return errors[0]

    return check


@pytest.fixture
def cli_eval_matches_library(capsys, corpus):
    """Run `fanformer eval CKPT --json` on the corpus in-process and check its perplexity
    and token count are `runtime.perplexity`'s on the same tokens; returns the JSON."""
    from fanformer.cli import main
    from fanformer.runtime import eval_tokens, load_backend, perplexity

    def check(checkpoint, max_tokens: int, ctx: int = 32) -> dict:
        capsys.readouterr()
        assert main(["eval", str(checkpoint), "--data", str(corpus), "--split", "all", "--ctx", str(ctx), "--json",
                     "--quiet", "--max-tokens", str(max_tokens)]) == 0
        reported = json.loads(capsys.readouterr().out)
        backend = load_backend(checkpoint)
        tokens = eval_tokens(backend.tokenizer, [str(corpus)], "all", max_tokens)
        expected = perplexity(backend, tokens, ctx=ctx)
        assert reported["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
        assert reported["tokens"] == expected.tokens == len(tokens) - 1
        return reported

    return check

