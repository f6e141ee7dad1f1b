"""Tests for fanformer.tokenizer: training, round trips, saving for transformers."""

import json

import pytest
from transformers import AutoTokenizer

from fanformer.errors import FANformerError
from fanformer.tokenizer import (
    BOS,
    EOS,
    MIN_VOCAB_SIZE,
    PAD,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🚀🎉\n",
    "for i in range(10):\n    print(i ** 2)\n",
] * 20

SAMPLES = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "naïve café 日本語 😀🚀👩‍👩‍👧 ÿ",
    "never seen in training: ǅ ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_token_ids_are_first(tok):
    assert special_token_ids(tok) == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    assert [tok.id_to_token(i) for i in range(3)] == [BOS, EOS, PAD]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text


def test_learns_merges(tok):
    # 3 specials + 256 bytes; anything beyond is learned merges.
    assert tok.get_vocab_size() > 259
    assert len(tok.encode("def add(a, b):").ids) < len("def add(a, b):".encode())


def test_training_is_deterministic():
    a = train_tokenizer(CORPUS, vocab_size=400)
    b = train_tokenizer(iter(CORPUS), vocab_size=400)
    assert a.to_str() == b.to_str()


@pytest.mark.parametrize("vocab_size", [0, 259, MIN_VOCAB_SIZE - 1])
def test_vocab_too_small(vocab_size):
    with pytest.raises(FANformerError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=vocab_size)


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").to_str() == tok.to_str()
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").to_str() == tok.to_str()
    assert not [p.name for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]  # no temp files left


def test_auto_tokenizer_matches_raw(tok, tmp_path):
    save_tokenizer(tok, tmp_path, model_max_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.is_fast
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 128
    for text in SAMPLES:
        raw = tok.encode(text).ids
        assert hf.encode(text) == raw  # no BOS/EOS added
        assert hf(text)["input_ids"] == raw
        assert hf.decode(raw) == text


def test_load_missing(tmp_path):
    with pytest.raises(FANformerError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_load_corrupt(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FANformerError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)


def test_load_foreign_tokenizer_without_specials(tok, tmp_path):
    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    del data["model"]["vocab"][EOS]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FANformerError, match="not trained by fanformer"):
        load_tokenizer(tmp_path)
