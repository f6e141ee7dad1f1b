"""Fixtures for the runtime tests: a trained tokenizer, a tiny checkpoint, random-init
models, and a fake backend whose logits are a chosen function of the tokens so far.

The fake backend recomputes every position from the whole unpadded history, so it is
right about caching and padding by construction: it tests the loops that drive a
backend (generation, perplexity, drift), never a model.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np

import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer
from fanformer.export import gguf_format as names
from fanformer.runtime.backend import Backend, BackendInfo

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20


class FakeBackend(Backend):
    """next_logits(prefix: list[int]) -> (vocab,) logits for the token after `prefix`."""

    def __init__(self, next_logits, vocab_size: int, tokenizer=None, max_seq_len: int = 64, eos_id: int = 1):
        self.next_logits = next_logits
        self.tokenizer = tokenizer
        self.info = BackendInfo(format="fake", path="<fake>", vocab_size=vocab_size, max_seq_len=max_seq_len,
                                bos_id=0, eos_id=eos_id, pad_id=2, dtype="fp32", device="cpu")

    def new_cache(self, batch_size):
        return {"ids": torch.zeros((batch_size, 0), dtype=torch.long)}

    def forward(self, input_ids, attention_mask, cache):
        past = cache["ids"] if cache is not None else input_ids[:, :0]
        ids = torch.cat([past, input_ids], dim=1)  # (B, S)
        # The Backend contract: the mask covers the cached and the new tokens.
        assert attention_mask.shape == ids.shape, (attention_mask.shape, ids.shape)
        if cache is not None:
            cache["ids"] = ids
        B, T = input_ids.shape
        out = torch.zeros((B, T, self.info.vocab_size))
        for b in range(B):
            for t in range(T):
                pos = past.shape[1] + t
                if attention_mask[b, pos]:
                    prefix = [int(i) for i, m in zip(ids[b, :pos + 1], attention_mask[b, :pos + 1]) if m]
                    out[b, t] = self.next_logits(prefix)
        return out


class CharTokenizer:
    """ids 0, 1, 2 = bos, eos, pad; 3 + i = the i-th lower-case letter."""

    alphabet = "abcdefghijklmnopqrstuvwxyz"
    vocab_size = 3 + len(alphabet)

    def encode(self, text):
        return SimpleNamespace(ids=[3 + self.alphabet.index(c) for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


@pytest.fixture(scope="session")
def fake_backend():
    return FakeBackend


@pytest.fixture(scope="session")
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


@pytest.fixture(scope="session")
def texts():
    return TEXTS


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """A random-init tiny FANformer over the tokenizer's vocabulary."""

    def make(seed: int = 0, **overrides) -> FANformer:
        torch.manual_seed(seed)
        config = FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size(), **overrides)
        return FANformer(config).eval()

    return make


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer, make_model):
    path = tmp_path_factory.mktemp("runtime") / "ckpt"
    save_checkpoint(path, make_model(seed=0), tokenizer)
    return path


@pytest.fixture(scope="session")
def rewrite():
    """rewrite(source, out, arch=None, drop_key=None, tensor_edit=None): a copy of the GGUF
    file `source` with one thing changed; tensor_edit(name, data, type) -> (name, data,
    type) or None."""
    return _rewrite


def _rewrite(source: Path, out: Path, arch: str | None = None, drop_key: str | None = None,
             tensor_edit=None) -> Path:
    reader = GGUFReader(source)
    arch = arch or reader.fields[names.GENERAL_ARCHITECTURE].contents()
    writer = GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in (names.GENERAL_ARCHITECTURE, drop_key):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    for tensor in reader.tensors:
        edited = (tensor.name, np.array(tensor.data), tensor.tensor_type)
        edited = tensor_edit(*edited) if tensor_edit else edited
        if edited is not None:
            writer.add_tensor(edited[0], edited[1], raw_dtype=edited[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
