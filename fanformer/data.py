"""Corpus discovery, document-level train/val/test split, and the token cache.

A corpus is a list of files, or folders of them (shards). `.txt`, `.md` and `.py` files
are one document each; `.jsonl` files, and their compressed forms `.jsonl.gz` and
`.jsonl.zst`, hold one document per line in a `text` field; `.parquet` files one per row
of their `text` column (the layouts pretraining corpora ship in). Everything but the
single-document text files is read as a stream, so a file may be larger than memory.
With no files given, the corpus is this Python installation's own standard library source.

Each document goes to train, val or test by a hash of its content, so the split does
not depend on file order and duplicates never straddle splits. Tokens are cached as
flat binary arrays, one per split, with EOS after every document (the nanoGPT
`train.bin` / `val.bin` layout), under a key that hashes the tokenizer, the split
fractions and every file's bytes (hashed as a stream too).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from fanformer.errors import FANformerError
from fanformer.tokenizer import special_token_ids

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
# Bump when the cache layout or document rules change, so old caches are not reused.
CACHE_VERSION = 2  # 2: files with NUL bytes are binary, skipped

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_GLOB_CHARS = set("*?[")
_BATCH_CHARS = 1 << 20  # encode_batch parallelises across docs; ~1 MB batches keep cores busy
_READ_BYTES = 1 << 20  # streamed reads (hashing, decompression)
_PARQUET_ROWS = 1024  # rows per record batch read from a Parquet file


# ---------------------------------------------------------------------------
# Corpus discovery


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def default_corpus_files() -> list[Path]:
    """The standard library's `.py` files, test suite included, that are valid UTF-8.

    The test suite is kept: it is ordinary Python and roughly doubles the corpus. The
    few deliberately non-UTF-8 files in it (encoding tests) are left out here, so the
    default corpus never triggers skip warnings.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        files.extend(Path(root) / n for n in names if n.endswith(".py"))
    return sorted(p for p in files if _is_utf8(p))


def _files_in_folder(folder: Path) -> list[Path]:
    # Hidden folders (.git, .venv) and bytecode caches are tooling, not corpus.
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found.extend(
            Path(root) / n for n in names if corpus_suffix(n) and not n.startswith(".")
        )
    return found


def _resolve_spec(spec: str) -> list[Path]:
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if _GLOB_CHARS & set(spec):
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        if not matches:
            raise FANformerError(
                f"glob {spec!r} matches nothing; check the pattern (quote it so the shell leaves it alone)"
            )
        found = []
        for m in matches:
            found.extend(_files_in_folder(m) if m.is_dir() else [m] if corpus_suffix(m.name) else [])
        if not found:
            raise FANformerError(f"glob {spec!r} matches no {supported} files; point it at text files")
        return found
    path = Path(spec).expanduser()
    if path.is_dir():
        found = _files_in_folder(path)
        if not found:
            raise FANformerError(f"folder {path} has no {supported} files; add some or pass another folder")
        return found
    if path.is_file():
        if not corpus_suffix(path.name):
            raise FANformerError(f"{path} has unsupported suffix {path.suffix!r}; use one of {supported}")
        return [path]
    raise FANformerError(f"{path} does not exist; pass an existing file, folder or glob")


def resolve_files(specs: Sequence[str] | None) -> list[Path]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated file list.

    No specs means the default corpus (`default_corpus_files`).
    """
    if not specs:
        files = default_corpus_files()
        if not files:
            raise FANformerError(
                "found no standard-library .py files for the default corpus; pass corpus files explicitly"
            )
    else:
        files = sorted({p.resolve() for spec in specs for p in _resolve_spec(str(spec))})
    if sum(p.stat().st_size for p in files) == 0:
        shown = ", ".join(str(p) for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise FANformerError(f"the corpus file(s) {shown} are all empty; pass files that contain text")
    return files


# ---------------------------------------------------------------------------
# Documents: one reader per format, each yielding (document, bytes of the file read so far)


def _whole_file(path: Path) -> Iterator[tuple[str, int]]:
    """The file is one document; raises UnicodeDecodeError if it is not UTF-8."""
    data = path.read_bytes()
    if b"\x00" in data:  # valid UTF-8, but no text file holds NUL bytes: a binary file with a text suffix
        raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "a NUL byte")
    # Bytes -> str without newline translation, so documents are exactly the file contents.
    yield data.decode("utf-8"), len(data)


def _json_lines(path: Path, lines: io.BufferedIOBase, position: Callable[[], int]) -> Iterator[tuple[str, int]]:
    """The `text` field of each line of a byte stream of JSON objects."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FANformerError(f"{where}: not UTF-8 ({e.reason}); JSON Lines must be UTF-8: fix or remove the line") from e
        except json.JSONDecodeError as e:
            raise FANformerError(
                f"{where}: not valid JSON ({e.msg}); each line must be an object like {{\"text\": \"...\"}}"
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise FANformerError(
                f"{where}: expected an object with a string 'text' field; fix or remove the line"
            )
        yield record["text"], position()


def _jsonl(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as raw:
        yield from _json_lines(path, raw, raw.tell)


def _jsonl_gz(path: Path) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as raw:
        try:
            yield from _json_lines(path, gzip.GzipFile(fileobj=raw), raw.tell)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise FANformerError(f"{path} is not a complete gzip file ({e}); re-download or remove it") from e


def _jsonl_zst(path: Path) -> Iterator[tuple[str, int]]:
    zstandard = _optional("zstandard", "0.22", path)
    with open(path, "rb") as raw:
        # read_across_frames: files written by `zstd` in parallel hold several frames.
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=_READ_BYTES, read_across_frames=True)
        try:
            yield from _json_lines(path, io.BufferedReader(stream, _READ_BYTES), raw.tell)
        except zstandard.ZstdError as e:
            raise FANformerError(f"{path} is not a complete zstd file ({e}); re-download or remove it") from e


def _parquet(path: Path) -> Iterator[tuple[str, int]]:
    """Each row's `text` (null rows skipped), read a record batch at a time."""
    pa = _optional("pyarrow", "15", path)
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise FANformerError(f"{path} is not a readable Parquet file ({e}); re-download or remove it") from e
    schema = table.schema_arrow
    if "text" not in schema.names:
        raise FANformerError(f"{path} has no 'text' column (it has {', '.join(schema.names)}); "
                             "rename the column that holds the documents to 'text'")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise FANformerError(f"{path}: column 'text' is {kind}, not strings; store the documents as strings")
    size, rows, done = path.stat().st_size, max(1, table.metadata.num_rows), 0
    for batch in table.iter_batches(batch_size=_PARQUET_ROWS, columns=["text"]):
        done += batch.num_rows
        position = size * done // rows  # Parquet is read by row group, not front to back: count rows
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text, position


def _optional(module: str, version: str, path: Path):
    """Import a reader's optional dependency, or say how to install it."""
    try:
        return __import__(module)
    except ImportError as e:
        raise FANformerError(f"reading {path.name} needs {module} ({e}): pip install '{module}>={version}' "
                             "(or pip install 'fanformer[data]')") from None


# Corpus formats: the end of a file's name -> its reader (a new format is one entry).
READERS: dict[str, Callable[[Path], Iterator[tuple[str, int]]]] = {
    ".txt": _whole_file, ".md": _whole_file, ".py": _whole_file,
    ".jsonl": _jsonl, ".jsonl.gz": _jsonl_gz, ".jsonl.zst": _jsonl_zst, ".parquet": _parquet,
}
SUPPORTED_SUFFIXES = tuple(READERS)


def corpus_suffix(name: str | Path) -> str | None:
    """The corpus format a file name ends with (the longest match: `.jsonl.gz`, not `.gz`), or None."""
    name = Path(name).name
    matches = [suffix for suffix in READERS if name.endswith(suffix)]
    return max(matches, key=len) if matches else None


def _read_documents(path: Path) -> Iterator[tuple[str, int]]:
    """Non-empty documents of one file with the bytes read so far; UnicodeDecodeError if a
    single-document file is not UTF-8."""
    path = Path(path)
    return ((doc, pos) for doc, pos in READERS[corpus_suffix(path)](path) if doc.strip())


def iter_documents(files: Sequence[Path]) -> Iterator[str]:
    """Yield every non-empty document in `files`, in order, streaming.

    Single-document files that are not UTF-8 are skipped and reported once through
    `logging`; a JSON line that is not UTF-8 is an error naming the line.
    """
    for doc, _ in _documents_with_progress(files):
        yield doc


def _documents_with_progress(files: Sequence[Path], progress: tqdm | None = None) -> Iterator[tuple[str, int]]:
    skipped = []
    for path in files:
        done = 0
        try:
            for doc, position in _read_documents(Path(path)):
                if progress is not None:
                    progress.update(max(0, position - done))
                done = max(done, position)
                yield doc, position
        except UnicodeDecodeError:
            skipped.append(str(path))
        if progress is not None:
            progress.update(max(0, Path(path).stat().st_size - done))
    if skipped:
        logger.warning("skipped %d file(s) that are not UTF-8 text (binary?): %s", len(skipped), ", ".join(skipped))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FANformerError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) "
            "and sum to less than 1, leaving documents for training"
        )


def split_of(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Assign a document to "train", "val" or "test" by a stable hash of its content."""
    _check_fractions(val_fraction, test_fraction)
    # sha256, not hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


# ---------------------------------------------------------------------------
# Token cache


@dataclass(frozen=True)
class TokenSplits:
    """Read-only token arrays per split; each document is followed by `eos_id`.

    Non-empty splits are `np.memmap`s; an empty split is a plain length-0 array
    (an empty file cannot be memory-mapped).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    dtype: np.dtype
    eos_id: int
    directory: Path


def default_cache_dir() -> Path:
    """`$FANFORMER_CACHE` if set, else `~/.cache/fanformer`."""
    return Path(os.environ.get("FANFORMER_CACHE") or Path.home() / ".cache" / "fanformer")


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32)


def corpus_digest(files: Sequence[Path]) -> bytes:
    """sha256 of the corpus content (not mtimes): every file's bytes and format, in order."""
    h = hashlib.sha256()
    for path in files:
        path = Path(path)
        # The format decides how a file splits into documents; order decides token order.
        h.update((corpus_suffix(path) or path.suffix).encode() + b"\0" + _file_sha256(path))
    return h.digest()


def _file_sha256(path: Path) -> bytes:
    """sha256 of a file's bytes, read in chunks (a shard may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            h.update(chunk)
    return h.digest()


def cache_key(files: Sequence[Path], tokenizer: Tokenizer, val_fraction: float, test_fraction: float) -> str:
    """sha256 over everything the cached tokens depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "val": val_fraction, "test": test_fraction}).encode())
    h.update(tokenizer.to_str().encode("utf-8"))
    h.update(corpus_digest(files))
    return h.hexdigest()


def _load_split(directory: Path, split: str, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    path = directory / f"{split}.bin"
    if not path.is_file() or path.stat().st_size != n_tokens * dtype.itemsize:
        raise FANformerError(
            f"token cache {directory} is incomplete or corrupt ({path.name}); delete that folder and rerun"
        )
    if n_tokens == 0:
        empty = np.zeros(0, dtype=dtype)
        empty.setflags(write=False)
        return empty
    return np.memmap(path, dtype=dtype, mode="r")


def _load_cache(directory: Path) -> TokenSplits:
    try:
        meta = json.loads((directory / META_FILE).read_text())
        dtype, eos_id = np.dtype(meta["dtype"]), int(meta["eos_id"])
        tokens = {s: int(meta["tokens"][s]) for s in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FANformerError(
            f"token cache {directory} has a bad {META_FILE} ({e}); delete that folder and rerun"
        ) from e
    arrays = {s: _load_split(directory, s, dtype, tokens[s]) for s in SPLITS}
    return TokenSplits(**arrays, dtype=dtype, eos_id=eos_id, directory=directory)


def _batches(files: Sequence[Path], progress: tqdm) -> Iterator[list[str]]:
    """Documents grouped into ~_BATCH_CHARS batches; advances `progress` by the bytes of the
    files (compressed bytes, for compressed ones) read so far."""
    batch, chars = [], 0
    for doc, _ in _documents_with_progress(files, progress):
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_splits(
    files: Sequence[Path],
    tokenizer: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    test_fraction: float,
    dtype: np.dtype,
    eos_id: int,
) -> dict:
    """Tokenize every document into out_dir/{split}.bin; return token and document counts."""
    tokens = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)
    outs = {s: open(out_dir / f"{s}.bin", "wb") for s in SPLITS}
    total_bytes = sum(Path(p).stat().st_size for p in files)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None) as progress:
            for batch in _batches(files, progress):
                # encode_batch_fast skips offset tracking, which the cache never uses (~1.5x faster).
                encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
                for doc, enc in zip(batch, encodings):
                    split = split_of(doc, val_fraction, test_fraction)
                    ids = np.array(enc.ids + [eos_id], dtype=dtype)
                    outs[split].write(ids.tobytes())
                    tokens[split] += len(ids)
                    documents[split] += 1
    finally:
        for f in outs.values():
            f.close()
    return {"tokens": tokens, "documents": documents}


def build_token_cache(
    files: Sequence[Path],
    tokenizer: Tokenizer,
    cache_dir: Path,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TokenSplits:
    """Tokenize `files` into per-split arrays under cache_dir/<key>/, or load them if cached.

    Raises FANformerError if no document lands in the train split.
    """
    _check_fractions(val_fraction, test_fraction)
    files = [Path(p) for p in files]
    cache_dir = Path(cache_dir)
    final = cache_dir / cache_key(files, tokenizer, val_fraction, test_fraction)
    if final.is_dir():
        logger.info("token cache hit: %s", final)
        return _load_cache(final)

    dtype, eos_id = _token_dtype(tokenizer), special_token_ids(tokenizer)["eos_token_id"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename it into place, so a crash or a
    # concurrent run never leaves a half-written cache under the final key.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{final.name[:16]}-"))
    try:
        counts = _write_splits(files, tokenizer, tmp, val_fraction, test_fraction, dtype, eos_id)
        if counts["tokens"]["train"] == 0:
            raise FANformerError(
                f"corpus too small: none of the {len(files)} file(s) gave a training document (files that are "
                "not UTF-8 text are skipped, with a warning); add more text"
            )
        meta = {
            "version": CACHE_VERSION,
            "dtype": dtype.name,
            "eos_id": eos_id,
            "vocab_size": tokenizer.get_vocab_size(),
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "files": len(files),
            **counts,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("token cache built: %s (%s)", final, counts["tokens"])
    return _load_cache(final)
