"""Degenerate corpora: one document (so no validation split), documents all shorter than a
window, and binary files give a working run with a warning or one clear FANformerError,
never a ZeroDivisionError or a model trained on bytes."""

import json
import logging
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fanformer.errors import FANformerError
from fanformer.pipeline import train_run
from fanformer.training import METRICS_FILE, evaluate

MODEL = dict(vocab_size=400, max_seq_len=32)
TRAIN = dict(max_steps=2, batch_size=2, warmup_steps=1, eval_every=1, eval_batches=2, log_every=1)


def run(tmp_path, files: dict[str, bytes]):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    return train_run(tmp_path / "out", data=[str(corpus)], model_overrides=MODEL, train_overrides=TRAIN,
                     cache_dir=tmp_path / "cache", progress=False)


def test_one_document_trains_without_val_loss_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fanformer"):
        last = run(tmp_path, {"one.py": Path(textwrap.__file__).read_bytes()})
    assert "the validation split has 0 tokens" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "out" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any("val_loss" in r for r in records)
    assert last["step"] == 2 and np.isfinite(last["loss"])


def test_documents_shorter_than_a_window_are_packed_together(tmp_path):
    docs = "".join(json.dumps({"text": f"x{i} = {i}\n"}) + "\n" for i in range(3000))  # ~6 tokens each
    last = run(tmp_path, {"short.jsonl": docs.encode()})
    assert last["step"] == 2 and "val_loss" in last


@pytest.mark.parametrize("data", [bytes(100_000), os.urandom(100_000)], ids=["nul-bytes", "random-bytes"])
def test_binary_files_are_skipped_and_named(tmp_path, caplog, data):
    with caplog.at_level(logging.WARNING, logger="fanformer"):
        with pytest.raises(FANformerError, match="corpus too small: none of the 1 file"):
            run(tmp_path, {"blob.txt": data})
    assert "not UTF-8 text (binary?)" in caplog.text and "blob.txt" in caplog.text


def test_evaluate_on_an_empty_split_is_none():
    model = torch.nn.Identity()
    assert evaluate(model, np.zeros(0, np.uint16), 32, 2, 2, torch.device("cpu")) is None
