"""`fanformer train` end to end: corpus -> tokenizer -> token cache -> model -> training.

The tokenizer is trained on the training split only (held-out documents never shape
it) and cached by the corpus's content hash, like the tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from fanformer.checkpoint import check_output_dir, is_sharded, load_model, load_training_state
from fanformer.config import FANformerConfig
from fanformer.data import (build_token_cache, corpus_digest, default_cache_dir, iter_documents, resolve_files,
                            split_of)
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters
from fanformer.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from fanformer.training import TrainConfig, init_distributed, train

log = logging.getLogger(__name__)


def corpus_tokenizer(files: list[Path], vocab_size: int, cache_dir: Path):
    """A BPE tokenizer trained on the corpus's training documents, cached by content."""
    key = hashlib.sha256(f"tokenizer-v1 {vocab_size}".encode() + corpus_digest(files)).hexdigest()
    cached = cache_dir / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)
    log.info("training a %d-token BPE tokenizer on %d files", vocab_size, len(files))
    docs = (doc for doc in iter_documents(files) if split_of(doc) == "train")
    tokenizer = train_tokenizer(docs, vocab_size)
    save_tokenizer(tokenizer, cached)
    return tokenizer


def train_run(out: str | Path, preset: str = "tiny", data: list[str] | None = None, resume: bool = False,
              force: bool = False, model_overrides: dict | None = None, train_overrides: dict | None = None,
              tokenizer_path: str | None = None, cache_dir: str | Path | None = None,
              progress: bool = True) -> dict:
    out = Path(out)
    model_overrides, train_overrides = model_overrides or {}, dict(train_overrides or {})
    dist_info = init_distributed()
    resume_state, model = None, None
    if resume:
        if model_overrides:
            raise FANformerError("the model config of a resumed run is fixed by its checkpoint; "
                                 f"drop {', '.join('--' + k.replace('_', '-') for k in model_overrides)}")
        if is_sharded(out):  # an FSDP run's: the weights come from its shards once the model is sharded
            model, config = None, FANformerConfig.from_file(out)
        else:
            model = load_model(out)  # fail on a damaged checkpoint before any data work
            config = model.config
        resume_state = load_training_state(out)
        saved = resume_state[1]["train_config"]
        # stop_at ends one invocation; a resumed run goes on to max_steps unless told again.
        train_config = TrainConfig(**{**saved, "stop_at": 0, **train_overrides})
        data = data or saved["extra"].get("data")
        preset = saved["extra"].get("preset", preset)
        tokenizer_path = str(out)
    else:
        if dist_info.main:
            check_output_dir(out, force)
        config = FANformerConfig.from_name(preset, **model_overrides)
        train_config = TrainConfig(**train_overrides)
    train_config.extra = {**train_config.extra, "data": data, "preset": preset}

    files = resolve_files(data)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    # Rank 0 prepares the tokenizer and token cache; the other ranks wait, then find them cached.
    if not dist_info.main:
        dist.barrier()
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else \
        corpus_tokenizer(files, config.vocab_size, cache_dir)
    splits = build_token_cache(files, tokenizer, cache_dir)
    if dist_info.main and dist_info.world > 1:
        dist.barrier()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise FANformerError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
                             f"vocab_size is {config.vocab_size}; raise --vocab-size")
    if dist_info.main:
        log.info("data: %d files, %s train / %s val tokens", len(files), f"{len(splits.train):,}", f"{len(splits.val):,}")

    if model is None:
        torch.manual_seed(train_config.seed)  # every rank builds the same initial weights
        model = FANformer(config)
    if dist_info.main:
        log.info("model: %s parameters", f"{count_parameters(model):,}")
    last = train(model, tokenizer, splits.train, splits.val, train_config, out, resume=resume_state,
                 progress=progress)
    if dist_info.main:
        log.info("saved %s: %s", out, json.dumps(last))
    if dist_info.world > 1:
        dist.destroy_process_group()  # a gloo group left to the interpreter's exit can abort it
    return last
