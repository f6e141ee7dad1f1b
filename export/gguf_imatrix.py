"""llama.cpp's importance-matrix file (`llama-imatrix -o F.gguf`, read by
`llama-quantize --imatrix F.gguf`): a GGUF with `general.type = "imatrix"`, the keys
`imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size`, and for every weight W
two F32 tensors, `W.in_sum2` (ne = [columns]: the sum over tokens of each input column's
x^2) and `W.counts` (ne = [1]: the tokens summed), as llama-imatrix writes them for a
dense model (ggml drops the expert dimension of 1; [columns, 1] and [1, 1] are read too).
Names are the model file's tensor names (export/gguf_format.py), so the file applies to
the GGUF of the same model.

The statistics come from quant/imatrix.py; gguf-py writes and reads the file. Reading
checks every entry (names, shapes, dtypes, finite non-negative sums, positive counts)
before anything uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from fanformer.errors import FANformerError
from fanformer.export import gguf_format as names
from fanformer.export.gguf_export import check_output_file
from fanformer.outputs import write_file_atomically

GENERAL_TYPE = "general.type"
IMATRIX = "imatrix"
DATASETS = "imatrix.datasets"
CHUNK_COUNT = "imatrix.chunk_count"
CHUNK_SIZE = "imatrix.chunk_size"
SUM2, COUNTS = ".in_sum2", ".counts"


def make_imatrix(checkpoint: str | Path, out: str | Path, data: list[str] | None = None, chunks: int = 64,
                 ctx: int = names.IMATRIX_CTX, cache_dir: str | Path | None = None, progress: bool = True,
                 force: bool = False) -> tuple[Path, int, int]:
    """Measure `checkpoint`'s importance matrix over `chunks` windows of `ctx` tokens (capped
    at its context) from the training split of `data` (default corpus if None) and write it
    at `out`; returns (out, windows, tokens per window)."""
    from fanformer.checkpoint import load_model, read_quantization_config

    checkpoint, out = Path(checkpoint), Path(out)
    if read_quantization_config(checkpoint) is not None:
        raise FANformerError(f"{checkpoint} is a quantized checkpoint; an importance matrix is measured on the "
                             "float model it came from")
    check_output_file(out, force)
    model = load_model(checkpoint)
    ctx = min(ctx, model.config.max_seq_len)
    stats, windows = measure_importance(checkpoint, model, data, chunks, ctx, cache_dir, progress)
    datasets = [str(d) for d in data] if data else ["the Python standard library"]
    write_imatrix(out, gguf_entries(stats, model.config.tie_embeddings), datasets, windows, ctx, force=force)
    return out, windows, ctx


def measure_importance(checkpoint: Path, model, data: list[str] | None, chunks: int, ctx: int,
                       cache_dir: str | Path | None = None, progress: bool = True) -> tuple[dict, int]:
    """quant/imatrix.py's statistics of the float `model` over `chunks` windows of `ctx` tokens
    from the training split of `data`, tokenized by `checkpoint`'s tokenizer; and the
    number of windows."""
    from fanformer.quant.calibration import calibration_tokens
    from fanformer.quant.imatrix import collect_importance
    from fanformer.tokenizer import load_tokenizer

    windows = calibration_tokens(load_tokenizer(checkpoint), data, chunks, ctx, cache_dir=cache_dir)
    return collect_importance(model, windows, progress=progress), len(windows)


def importance_means(stats: dict, tied: bool) -> dict[str, np.ndarray]:
    """{GGUF weight name: per-column mean of x^2}, what `read_imatrix` gives from a file."""
    return {name: (sum_x2 / count).astype(np.float32) for name, (sum_x2, count) in gguf_entries(stats, tied).items()}


def gguf_entries(stats: dict, tied: bool) -> dict[str, tuple[np.ndarray, int]]:
    """{GGUF weight name: (sum of x^2 per column, tokens)} from quant/imatrix.py's
    {state_dict key: Importance}; a tied LM head's statistics belong to token_embd.weight,
    the tensor its matmul reads."""
    entries = {}
    for key, entry in stats.items():
        name = "token_embd.weight" if tied and key == "lm_head.weight" else names.gguf_tensor_name(key)
        entries[name] = (entry.sum_x2, entry.count)
    return entries


def write_imatrix(out: Path, entries: dict[str, tuple[np.ndarray, int]], datasets: list[str], chunk_count: int,
                  chunk_size: int, force: bool = False) -> Path:
    """Write `entries` as llama.cpp's imatrix GGUF at `out` (atomically)."""
    out = check_output_file(Path(out), force)

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, arch=None)
        try:
            writer.add_key_value(GENERAL_TYPE, IMATRIX, GGUFValueType.STRING)
            writer.add_array(DATASETS, list(datasets))
            writer.add_uint32(CHUNK_COUNT, chunk_count)
            writer.add_uint32(CHUNK_SIZE, chunk_size)
            for name, (sum_x2, count) in entries.items():
                writer.add_tensor(name + SUM2, np.asarray(sum_x2, dtype=np.float32))  # ne = [cols]
                writer.add_tensor(name + COUNTS, np.array([count], dtype=np.float32))  # ne = [1]
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return write_file_atomically(out, write)


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """{GGUF weight name: per-column mean of x^2 (float32)} from an imatrix GGUF (ours or
    llama-imatrix's); every problem is one FANformerError naming the file and entry."""
    path = Path(path)
    if not path.is_file():
        raise FANformerError(f"importance matrix {path} does not exist; make one with `fanformer imatrix`")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError, struct.error, ... on a damaged file
        raise FANformerError(f"{path} is not a readable GGUF importance matrix ({err})") from None
    field = reader.fields.get(GENERAL_TYPE)
    kind = field.contents() if field is not None else None
    if kind != IMATRIX:
        raise FANformerError(f"{path} is a GGUF file but not an importance matrix (general.type {kind!r}); "
                             "make one with `fanformer imatrix` or llama.cpp's llama-imatrix")
    tensors = {t.name: t for t in reader.tensors}
    means = {}
    for name in sorted(n[: -len(SUM2)] for n in tensors if n.endswith(SUM2)):
        sums, counts = tensors[name + SUM2], tensors.get(name + COUNTS)
        if counts is None:
            raise FANformerError(f"{path}: {name} has {SUM2} but no {COUNTS}")
        sums_array, counts_array = np.asarray(sums.data), np.asarray(counts.data)
        if sums_array.dtype != np.float32 or counts_array.dtype != np.float32:
            raise FANformerError(f"{path}: {name}'s statistics must be F32")
        if not (sums_array.ndim == 1 or (sums_array.ndim == 2 and sums_array.shape[0] == 1)) \
                or counts_array.size != 1:
            raise FANformerError(f"{path}: {name} holds per-expert statistics {tuple(sums_array.shape)}; "
                                 "this model has no experts")
        count = float(counts_array.reshape(-1)[0])
        if not np.isfinite(count) or count <= 0 or not np.all(np.isfinite(sums_array)) or np.any(sums_array < 0):
            raise FANformerError(f"{path}: {name} has invalid statistics (non-finite, negative, or no tokens)")
        means[name] = (sums_array.reshape(-1) / count).astype(np.float32)
    if not means:
        raise FANformerError(f"{path} holds no {SUM2} entries")
    return means
