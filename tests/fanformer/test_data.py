"""Tests for fanformer.data: file resolution, documents, split, token cache."""

import json
import logging
import sys

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


# --- Pretraining corpus formats: Parquet, .jsonl.gz, .jsonl.zst, folders of shards ----------


def write_shards(root, docs, shards=3):
    """The same documents as Parquet, .jsonl.gz and .jsonl.zst shards (each format its own
    folder, `shards` files each, several Parquet row groups and zstd frames per file)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    parts = [docs[i::shards] for i in range(shards)]
    for fmt in ("parquet", "gz", "zst"):
        (root / fmt).mkdir(parents=True)
    for i, part in enumerate(parts):
        lines = "".join(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(part)).encode()
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), root / "parquet" / f"train-{i:05d}.parquet",
                       row_group_size=7)
        (root / "gz" / f"train-{i:05d}.jsonl.gz").write_bytes(gzip.compress(lines))
        half = len(lines) // 2  # two frames, as parallel zstd writes
        compressor = zstandard.ZstdCompressor()
        (root / "zst" / f"train-{i:05d}.jsonl.zst").write_bytes(
            compressor.compress(lines[:half]) + compressor.compress(lines[half:]))
    return parts


@pytest.mark.parametrize("fmt", ["parquet", "gz", "zst"])
def test_shard_folders_read_like_plain_jsonl(tmp_path, tok, fmt):
    """A folder of shards gives the documents, and the cached tokens, that the same shards
    as plain .jsonl give (an independent reader: json.loads per line)."""
    parts = write_shards(tmp_path / "shards", DOCS)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, part in enumerate(parts):
        (plain / f"train-{i:05d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    files = resolve_files([str(tmp_path / "shards" / fmt)])
    assert [data.corpus_suffix(p) for p in files] == [{"gz": ".jsonl.gz", "zst": ".jsonl.zst"}.get(fmt, ".parquet")] * 3
    assert list(iter_documents(files)) == [d for part in parts for d in part]
    shards = build_token_cache(files, tok, tmp_path / "cache")
    reference = build_token_cache(resolve_files([str(plain)]), tok, tmp_path / "cache")
    assert shards.directory != reference.directory  # keyed by the files' own bytes
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(shards, split), getattr(reference, split))
    again = build_token_cache(files, CountingTokenizer(tok, fail=True), tmp_path / "cache")
    assert again.directory == shards.directory  # cached by content hash


def test_mixed_folder_of_all_formats(tmp_path):
    write_shards(tmp_path, DOCS)
    (tmp_path / "notes.txt").write_text("a plain document")
    (tmp_path / "README.json").write_text("{}")  # not a corpus format: ignored
    files = resolve_files([str(tmp_path)])
    assert len(files) == 10
    assert sorted(iter_documents(files)) == sorted(DOCS * 3 + ["a plain document"])


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_json_lines_are_streamed_not_read_whole(tmp_path, suffix, monkeypatch):
    """Python's peak allocation while reading and hashing stays at the read buffers (1 MB),
    far below the file's size."""
    import gzip
    import tracemalloc

    import zstandard

    doc = "x" * 4000
    lines = "".join(json.dumps({"text": f"{i} {doc}"}) + "\n" for i in range(4000)).encode()  # 16 MB
    compress = {".jsonl": bytes, ".jsonl.gz": lambda b: gzip.compress(b, 1),
                ".jsonl.zst": zstandard.ZstdCompressor().compress}[suffix]
    path = tmp_path / f"big{suffix}"
    path.write_bytes(compress(lines))
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents([path]))
        digest = data.corpus_digest([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4000 and len(digest) == 32
    assert peak < len(lines) / 4, f"peak {peak} bytes for a {len(lines)}-byte file"


def test_tokenizing_reports_progress_in_file_bytes(tmp_path, tok, monkeypatch):
    write_shards(tmp_path, DOCS)
    files = resolve_files([str(tmp_path / "zst")]) + resolve_files([str(tmp_path / "parquet")])
    seen = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0

        def update(self, n):
            assert n >= 0
            self.n += n
            seen.append(self.n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            assert self.n == self.total  # every byte of every file counted, once

    monkeypatch.setattr(data, "tqdm", Bar)
    build_token_cache(files, tok, tmp_path / "cache")
    assert len(seen) >= len(files) and seen[-1] == sum(p.stat().st_size for p in files)


def test_bad_shards_say_what_to_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "no_text.parquet")
    with pytest.raises(FANformerError, match="no 'text' column .*content"):
        list(iter_documents([tmp_path / "no_text.parquet"]))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(FANformerError, match="column 'text' is int64"):
        list(iter_documents([tmp_path / "ints.parquet"]))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip_bytes(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(FANformerError, match="cut.jsonl.gz is not a complete gzip file"):
        list(iter_documents([tmp_path / "cut.jsonl.gz"]))
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(FANformerError, match="junk.jsonl.zst is not a complete zstd file"):
        list(iter_documents([tmp_path / "junk.jsonl.zst"]))
    (tmp_path / "latin.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(FANformerError, match=r"latin\.jsonl:2: not UTF-8"):
        list(iter_documents([tmp_path / "latin.jsonl"]))


def gzip_bytes(data_: bytes) -> bytes:
    import gzip

    return gzip.compress(data_)


@pytest.mark.parametrize("module, name", [("pyarrow", "a.parquet"), ("zstandard", "a.jsonl.zst")])
def test_missing_optional_reader_says_what_to_install(tmp_path, monkeypatch, module, name):
    (tmp_path / name).write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(FANformerError, match=rf"reading {name} needs {module}.*pip install '{module}>="):
        list(iter_documents([tmp_path / name]))
