"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers`.

The scheme is GPT-2's (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", section 2.2): text is split into UTF-8 bytes, each byte maps to
one of 256 printable characters, and BPE merges (Sennrich et al. 2016) are learned on
top. Every string therefore encodes losslessly, with no unknown token.

Saved tokenizers are plain `tokenizer.json` files plus the small config files that
let `transformers.AutoTokenizer.from_pretrained(directory)` load them as a fast
tokenizer. Neither path adds BOS/EOS on its own: callers insert special tokens
explicitly (the token cache appends EOS after each document).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fanformer.errors import FANformerError
from fanformer.outputs import write_file_atomically
from fanformer.validate import foreign_errors, read_json

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
# Order matters: the trainer assigns ids in this order, so BOS=0, EOS=1, PAD=2.
SPECIAL_TOKENS = (BOS, EOS, PAD)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

_BYTE_ALPHABET_SIZE = 256
# A vocabulary that is only bytes + specials is a byte-level model with BPE overhead;
# require at least a handful of merges so the setting is not a silent mistake.
_MIN_MERGES = 64
MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS) + _MIN_MERGES


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    The result may hold fewer than `vocab_size` tokens when the corpus runs out of
    pairs to merge; use `tok.get_vocab_size()` as the true size. Training is
    deterministic: the same texts in the same order give the same tokenizer JSON.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise FANformerError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs "
            f"{_BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens "
            f"+ at least {_MIN_MERGES} merges; use vocab_size >= {MIN_VOCAB_SIZE}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only affects offsets (no ids are added); keeps offset mappings byte-accurate.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Return {"bos_token_id", "eos_token_id", "pad_token_id"} for `tok`."""
    ids = {}
    for name, token in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD)):
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise FANformerError(
                f"tokenizer has no {token!r} token; it was not trained by fanformer. "
                "Train one with fanformer.tokenizer.train_tokenizer"
            )
        ids[name] = token_id
    return ids


def _write_atomic(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _tokenizer_config(model_max_length: int | None) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        # Match the raw tokenizer: no BOS/EOS inserted behind the caller's back.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
    """Write `tok` to `directory` in the layout `transformers.AutoTokenizer` loads.

    Files: tokenizer.json, tokenizer_config.json, special_tokens_map.json. Returns the
    directory.
    """
    special_token_ids(tok)  # fail before writing anything if specials are missing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    _write_atomic(directory / TOKENIZER_FILE, tok.to_str(pretty=True))
    config = _tokenizer_config(model_max_length)
    _write_atomic(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2))
    _write_atomic(directory / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_map, indent=2))
    return directory


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json, or from the file itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FANformerError(
            f"no tokenizer at {file}: train and save a tokenizer there first, or pass its path"
        )
    text = read_json(file)  # JSON errors (and nesting too deep for the Rust parser) named as such
    # The Rust side raises a bare Exception for a bad vocabulary, or panics: both become one error.
    with foreign_errors(f"{file} is not a valid tokenizer.json; delete it and train a new tokenizer"):
        tok = Tokenizer.from_str(json.dumps(text))
        special_token_ids(tok)
        # A vocabulary can parse and still fail on use (merges over missing tokens, ids past the
        # vocabulary): one round trip now, so a damaged file fails at load and not mid-generation.
        tok.decode(tok.encode(PROBE_TEXT).ids)
    return tok


# Letters, digits, punctuation, whitespace and multi-byte UTF-8: every pre-tokenizer branch.
PROBE_TEXT = "Hello, world! 123 \t\n def f(x): return x ** 2  # π ≈ 3.14 🙂"
