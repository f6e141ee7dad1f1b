"""Calibration batches for GPTQ and AWQ: random windows of the corpus's TRAINING
split, never the validation or test split the drift is measured on.

The corpus goes through the same document split and token cache as training
(`fanformer.data`), tokenized with the checkpoint's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fanformer.data import build_token_cache, default_cache_dir, resolve_files
from fanformer.errors import FANformerError


def calibration_windows(tokens: np.ndarray, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets -> (samples, seq_len) int64."""
    needed = samples * seq_len
    if len(tokens) < needed:
        raise FANformerError(
            f"calibration data too small: the training split has {len(tokens):,} tokens, but "
            f"{samples} samples x {seq_len} tokens need at least {needed:,}; give more text with "
            "--calib-data, or lower --calib-samples / --calib-seq-len")
    generator = np.random.default_rng(seed)
    starts = generator.integers(0, len(tokens) - seq_len + 1, size=samples)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


def calibration_tokens(tokenizer, data: list[str] | None, samples: int, seq_len: int, seed: int = 0,
                       cache_dir: str | Path | None = None) -> torch.Tensor:
    """Windows from the training split of `data` (files, folders, globs; default corpus if None)."""
    files = resolve_files(data)
    splits = build_token_cache(files, tokenizer, Path(cache_dir) if cache_dir else default_cache_dir())
    return calibration_windows(splits.train, samples, seq_len, seed)
