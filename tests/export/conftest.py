"""The overfit tiny model (tests/conftest.py's `overfit`) as the export tests share it."""

import pytest

from fanformer.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def overfit_tiny(train_overfit):
    """(model, tokenizer, ids): do not modify the model (copy it first)."""
    return train_overfit()


@pytest.fixture(scope="session")
def overfit_checkpoint(overfit_tiny, tmp_path_factory):
    model, tokenizer, _ = overfit_tiny
    path = tmp_path_factory.mktemp("overfit") / "ckpt"
    save_checkpoint(path, model, tokenizer)
    return path
