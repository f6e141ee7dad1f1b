"""Tests for fanformer.data: file resolution, documents, split, token cache."""

import json
import logging

import numpy as np
import pytest

from fanformer import data
from fanformer.data import (
    SUPPORTED_SUFFIXES,
    build_token_cache,
    default_cache_dir,
    default_corpus_files,
    iter_documents,
    resolve_files,
    split_of,
)
from fanformer.errors import FANformerError
from fanformer.tokenizer import train_tokenizer

DOCS = [f"document {i}: {'lorem ipsum ' * (i % 7 + 1)} ünïcödé 🚀 #{i}\n" for i in range(120)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=400)


@pytest.fixture
def corpus(tmp_path):
    """Mixed corpus: 60 .txt/.md/.py files and one .jsonl with 60 lines."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:60]):
        suffix = (".txt", ".md", ".py")[i % 3]
        (root / ("sub" if i % 2 else "") / f"f{i:03d}{suffix}").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"text": d}) for d in DOCS[60:]]
    (root / "sub" / "more.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return root


class CountingTokenizer:
    """Wraps a tokenizers.Tokenizer (which cannot be subclassed) to count encode calls."""

    def __init__(self, tok, fail=False):
        self.tok, self.fail, self.calls = tok, fail, 0

    def __getattr__(self, name):
        attr = getattr(self.tok, name)
        if not name.startswith("encode"):
            return attr

        def counted(*args, **kwargs):
            self.calls += 1
            if self.fail:
                raise AssertionError(f"{name} called on a cache hit")
            return attr(*args, **kwargs)

        return counted


# --- resolve_files ---------------------------------------------------------


def test_resolve_folder_file_glob(corpus):
    everything = resolve_files([str(corpus)])
    assert len(everything) == 61
    assert everything == sorted(everything)
    assert {p.suffix for p in everything} <= set(SUPPORTED_SUFFIXES)
    one = corpus / "f000.txt"
    assert resolve_files([str(one)]) == [one.resolve()]
    py = resolve_files([str(corpus / "**" / "*.py")])
    assert len(py) == 20 and all(p.suffix == ".py" for p in py)
    # Overlapping specs are de-duplicated.
    assert resolve_files([str(corpus), str(one), str(corpus / "*.txt")]) == everything


def test_resolve_skips_hidden_and_unsupported(corpus):
    (corpus / ".git").mkdir()
    (corpus / ".git" / "x.txt").write_text("hidden")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    assert len(resolve_files([str(corpus)])) == 61


def test_resolve_default_is_stdlib():
    files = resolve_files(None)
    assert files == resolve_files([]) == default_corpus_files()
    names = {p.name for p in files}
    assert {"os.py", "__init__.py", "argparse.py"} <= names
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    assert not any(excluded & set(p.parts) for p in files)
    assert files == sorted(files)


@pytest.mark.parametrize(
    "make_spec, message",
    [
        (lambda root: str(root / "missing.txt"), "does not exist"),
        (lambda root: str(root / "empty_dir"), "has no"),
        (lambda root: str(root / "*.nomatch"), "matches nothing"),
        (lambda root: str(root / "*.png"), "matches no"),
        (lambda root: str(root / "image.png"), "unsupported suffix"),
        (lambda root: str(root / "empty.txt"), "all empty"),
    ],
)
def test_resolve_errors(tmp_path, make_spec, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("")
    spec = make_spec(tmp_path)
    with pytest.raises(FANformerError, match=message) as info:
        resolve_files([spec])
    assert spec.split("/")[-1] in str(info.value)  # the message names the path


# --- iter_documents --------------------------------------------------------


def test_iter_documents(corpus):
    docs = list(iter_documents(resolve_files([str(corpus)])))
    assert sorted(docs) == sorted(DOCS)


def test_jsonl_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(FANformerError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents([bad]))
    bad.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(FANformerError, match=r"bad\.jsonl:3: .*'text' field"):
        list(iter_documents([bad]))


def test_skips_empty_and_undecodable(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("kept")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="fanformer.data"):
        docs = list(iter_documents(sorted(tmp_path.iterdir())))
    assert docs == ["kept"]
    assert "latin1.txt" in caplog.text and "1 file" in caplog.text


def test_documents_keep_exact_bytes(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\r\n")
    assert list(iter_documents([tmp_path / "crlf.txt"])) == ["a\r\nb\r\n"]


# --- split_of --------------------------------------------------------------


def test_split_is_deterministic_and_content_based():
    texts = [f"doc {i}" for i in range(4000)]
    splits = [split_of(t) for t in texts]
    assert splits == [split_of(t) for t in reversed(texts)][::-1]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    # 5% each of 4000 docs = 200; a fair hash lands within a few standard deviations (~14).
    assert 140 < counts["val"] < 260 and 140 < counts["test"] < 260
    assert split_of("x", val_fraction=0.0, test_fraction=0.0) == "train"
    # Fractions move documents monotonically: a val doc stays val with a larger val share.
    assert all(split_of(t, 0.5, 0.05) == "val" for t, s in zip(texts, splits) if s == "val")


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (0.5, 0.5), (1.0, 0.0)])
def test_split_bad_fractions(val, test):
    with pytest.raises(FANformerError, match="val_fraction"):
        split_of("x", val, test)


# --- token cache -----------------------------------------------------------


def _reference(tok, docs, val, test):
    eos = tok.token_to_id("<|eos|>")
    out = {"train": [], "val": [], "test": []}
    for doc in docs:
        out[split_of(doc, val, test)] += tok.encode(doc).ids + [eos]
    return out


def test_cache_matches_direct_encoding(corpus, tok, tmp_path):
    files = resolve_files([str(corpus)])
    splits = build_token_cache(files, tok, tmp_path / "cache", val_fraction=0.2, test_fraction=0.2)
    expected = _reference(tok, iter_documents(files), 0.2, 0.2)
    assert splits.dtype == np.uint16 and splits.eos_id == 1
    for name in ("train", "val", "test"):
        array = getattr(splits, name)
        assert isinstance(array, np.memmap) and not array.flags.writeable
        assert array.tolist() == expected[name]
    assert len(splits.val) > 0 and len(splits.test) > 0
    # Each document appears in exactly one split.
    all_ids = splits.train.tolist() + splits.val.tolist() + splits.test.tolist()
    assert all_ids.count(1) == len(DOCS)
    meta = json.loads((splits.directory / "meta.json").read_text())
    assert sum(meta["documents"].values()) == len(DOCS)


def test_cache_hit_does_not_retokenize(corpus, tok, tmp_path):
    files = resolve_files([str(corpus)])
    first = CountingTokenizer(tok)
    a = build_token_cache(files, first, tmp_path / "cache")
    assert first.calls > 0
    b = build_token_cache(files, CountingTokenizer(tok, fail=True), tmp_path / "cache")
    assert a.directory == b.directory
    np.testing.assert_array_equal(a.train, b.train)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [a.directory.name]  # no temp dirs left


def test_cache_key_changes_with_content(corpus, tok, tmp_path):
    files = resolve_files([str(corpus)])
    a = build_token_cache(files, tok, tmp_path)
    files[0].write_text("changed content " * 10)
    b = build_token_cache(files, tok, tmp_path)
    assert a.directory != b.directory
    c = build_token_cache(files, tok, tmp_path, val_fraction=0.1)
    assert c.directory not in (a.directory, b.directory)


def test_cache_empty_split_and_too_small(tmp_path, tok):
    (tmp_path / "one.txt").write_text("a single small document")
    files = [tmp_path / "one.txt"]
    assert split_of("a single small document") == "train"  # fixed by its hash
    splits = build_token_cache(files, tok, tmp_path / "cache")
    assert len(splits.val) == 0 and len(splits.test) == 0
    assert not isinstance(splits.val, np.memmap) and not splits.val.flags.writeable
    # Everything to val and test (99%) makes train empty for this one document.
    with pytest.raises(FANformerError, match="corpus too small"):
        build_token_cache(files, tok, tmp_path / "cache2", val_fraction=0.5, test_fraction=0.49999)
    assert not any((tmp_path / "cache2").iterdir())


def test_uint32_for_large_vocab(tok):
    big = CountingTokenizer(tok)
    big.get_vocab_size = lambda: 70_000
    assert data._token_dtype(big) == np.uint32
    assert data._token_dtype(tok) == np.uint16


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FANFORMER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FANFORMER_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "fanformer")
