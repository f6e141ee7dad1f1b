"""Reading a GGUF file into the project's terms: the header checked, the metadata typed,
the FANformerConfig and the tokenizer rebuilt, llama files' RoPE rows un-permuted. The
reader beside its writer (export/gguf_export.py); runtime/gguf_backend.py runs what it reads.

Format: GGUF v2/v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), read
memory-mapped with gguf-py's `GGUFReader`; every key and tensor name comes from
export/gguf_format.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.export import gguf_format as names
from fanformer.export.gguf_scan import scan_gguf
from fanformer.tokenizer import PROBE_TEXT
from fanformer.validate import check_block_count, foreign_errors

_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")

SUPPORTED_VERSIONS = (2, 3)


# --- Reading the file: header, config, tokenizer ------------------------------------

def open_gguf(path: Path) -> GGUFReader:
    """The memory-mapped file, or one FANformerError saying what is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise FANformerError(f"{path} is {len(head)} bytes long: too short to be a GGUF file (truncated?)")
    if head[:4] != names.MAGIC:
        raise FANformerError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, not {names.MAGIC!r}")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise FANformerError(f"{path} is GGUF version {version}; this reader supports versions "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}: convert it with a current llama.cpp")
    scan_gguf(path)  # every count and length within the file, before GGUFReader trusts them
    try:
        # Copy-on-write: writable arrays for torch without touching the file; nothing is ever written.
        reader = GGUFReader(path, "c")
    except Exception as err:  # gguf-py raises ValueError, IndexError, ... on a malformed header
        raise FANformerError(f"{path} is truncated or corrupted ({type(err).__name__}: {err}); "
                             "export it again") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise FANformerError(f"{path} is truncated: tensor {tensor.name} needs bytes up to "
                                 f"{tensor.data_offset + tensor.n_bytes:,} but the file has {size:,}; export it again")
    return reader


class Metadata:
    """The key/value section, with errors that name the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None, arch: str | None = None):
        key = key.format(arch=arch)
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as err:
            raise FANformerError(f"{self.path}: key {key} cannot be read ({err}); the file is corrupted") from None

    def require(self, key: str, arch: str | None = None, kind: type = int):
        value = self.get(key, arch=arch)
        if value is None:
            raise FANformerError(f"{self.path} has no {key.format(arch=arch)} key: it is incomplete; export it again")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # Stored as float32: take the shortest decimal that rounds to it, so 1e-6 comes back as 1e-6.
            return float(str(np.float32(value)))
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FANformerError(f"{self.path}: key {key.format(arch=arch)} is {value!r}, expected a {kind.__name__}")
        return value


def config_from_metadata(meta: Metadata, arch: str, tensor_names: set[str]) -> FANformerConfig:
    """The model config from the keys alone. A llama file is p = 0, pre-norm, no CoLA,
    no gates, tied exactly when it has no output.weight."""
    d_model = meta.require(names.EMBEDDING_LENGTH, arch)
    n_heads = meta.require(names.HEAD_COUNT, arch)
    fields = dict(
        d_model=d_model, n_layers=meta.require(names.BLOCK_COUNT, arch), n_heads=n_heads,
        ffn_dim=meta.require(names.FEED_FORWARD_LENGTH, arch), max_seq_len=meta.require(names.CONTEXT_LENGTH, arch),
        norm_eps=meta.require(names.RMS_EPS, arch, float),
    )
    if arch == names.ARCH:
        fields.update(
            vocab_size=meta.require(names.VOCAB_SIZE, arch), n_kv_heads=meta.require(names.HEAD_COUNT_KV, arch),
            head_dim=meta.require(names.KEY_LENGTH, arch), rope_theta=meta.require(names.ROPE_FREQ_BASE, arch, float),
            p=meta.require(names.FAN_PERIODIC_RATIO, arch, float),
            fan_activation=meta.require(names.FAN_ACTIVATION, arch, str),
            norm=meta.require(names.NORM_SCHEME, arch, str), cola_rank=meta.require(names.COLA_RANK_RATIO, arch, float),
            cola_lm_head=meta.require(names.COLA_LM_HEAD, arch, bool),
            gated_residual=meta.require(names.GATED_RESIDUAL, arch, bool),
            tie_embeddings=meta.require(names.TIE_EMBEDDINGS, arch, bool))
    else:  # llama.cpp's defaults for the keys its llama loader treats as optional
        tokens = meta.get(names.TOKENIZER_TOKENS)
        fields.update(
            vocab_size=meta.get(names.VOCAB_SIZE, len(tokens) if tokens else None, arch),
            n_kv_heads=meta.get(names.HEAD_COUNT_KV, n_heads, arch),
            head_dim=meta.get(names.KEY_LENGTH, d_model // n_heads if n_heads else 0, arch),
            rope_theta=float(str(np.float32(meta.get(names.ROPE_FREQ_BASE, 10000.0, arch)))),
            p=0.0, norm="pre", tie_embeddings="output.weight" not in tensor_names)
        if fields["vocab_size"] is None:
            raise FANformerError(f"{meta.path} has neither {names.VOCAB_SIZE.format(arch=arch)} "
                                 f"nor {names.TOKENIZER_TOKENS}: it is incomplete")
    try:
        config = FANformerConfig(**fields)
    except FANformerError as err:
        raise FANformerError(f"{meta.path}: its hyperparameters are not a valid model ({err})") from None
    # Before a model of this size is built: the sizes within the file, the blocks present.
    config.check_sizes(meta.path.stat().st_size, meta.path)
    check_block_count(config.n_layers, tensor_names, meta.path, _GGUF_BLOCK, names.BLOCK_COUNT.format(arch=arch))
    if arch == names.ARCH and meta.get(names.FAN_PERIODIC_LENGTH, arch=arch) not in (None, config.d_periodic):
        raise FANformerError(f"{meta.path}: {names.FAN_PERIODIC_LENGTH.format(arch=arch)} disagrees with "
                             f"{names.EMBEDDING_LENGTH.format(arch=arch)} * {names.FAN_PERIODIC_RATIO.format(arch=arch)}")
    return config


def tokenizer_from_metadata(meta: Metadata) -> tuple[Tokenizer, dict[str, int]]:
    """The byte-level BPE from tokenizer.ggml.* (GPT-2's scheme, as fanformer/tokenizer.py
    trains it), and its bos / eos / pad ids. Control tokens become special tokens;
    unused rows (a vocab padded past the tokenizer) are left out, as in tokenizer.json."""
    kind = meta.require(names.TOKENIZER_MODEL, kind=str)
    if kind != names.TOKENIZER_MODEL_GPT2:
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_MODEL} is {kind!r}; only byte-level BPE "
                             f"({names.TOKENIZER_MODEL_GPT2!r}) is supported")
    tokens = meta.require(names.TOKENIZER_TOKENS, kind=list)
    types = meta.get(names.TOKENIZER_TOKEN_TYPE) or [int(TokenType.NORMAL)] * len(tokens)
    merges = meta.require(names.TOKENIZER_MERGES, kind=list)
    if not isinstance(types, list):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_TOKEN_TYPE} must be an array")
    if not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_TOKENS} and {names.TOKENIZER_MERGES} must hold strings")
    if len(types) != len(tokens):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_TOKEN_TYPE} has {len(types)} entries for "
                             f"{len(tokens)} tokens")
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != TokenType.UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise FANformerError(f"{meta.path}: {names.TOKENIZER_MERGES} holds an entry that is not \"a b\"")
    with foreign_errors(f"{meta.path}: its tokenizer.ggml.* keys do not make a valid tokenizer"):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == TokenType.CONTROL])
        tok.decode(tok.encode(PROBE_TEXT).ids)  # fails now, not mid-generation
    eos = meta.require(names.TOKENIZER_EOS_ID)
    ids = {"bos_id": meta.require(names.TOKENIZER_BOS_ID), "eos_id": eos,
           "pad_id": meta.get(names.TOKENIZER_PAD_ID, eos)}
    for name, i in ids.items():
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise FANformerError(f"{meta.path}: the {name.split('_')[0]} token id {i} is outside the "
                                 f"{len(tokens)}-token vocabulary")
    return tok, ids


def llama_unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute on Q or K rows: llama.cpp's
    interleaved RoPE pairs (2i, 2i + 1) back to rotate-half pairs (i, i + hs/2). Rows move
    whole, so this works on quantized rows as stored."""
    out = rows.shape[0]
    return (rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))
