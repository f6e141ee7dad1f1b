"""A tiny model overfit on two short texts, shared by the export tests.

Forty steps take its loss near 0.01, so next-token distributions are peaked as a real
model's are; random-init logits are so flat that any rounding flips their argmax, which
would make agreement checks of quantized exports meaningless.
"""

import pytest
import torch

from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.tokenizer import train_tokenizer

OVERFIT_TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20


def overfit(**options):
    """(model, tokenizer, ids): a `tiny` model with config `options`, overfit on OVERFIT_TEXTS."""
    tokenizer = train_tokenizer(OVERFIT_TEXTS, 400)
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size(), **options))
    ids = torch.tensor(tokenizer.encode("".join(OVERFIT_TEXTS[:8])).ids[:65])[None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, ids


@pytest.fixture(scope="session")
def train_overfit():
    """`overfit`, for tests that need other model options than `overfit_tiny`'s."""
    return overfit


@pytest.fixture(scope="session")
def overfit_tiny():
    """(model, tokenizer, ids): do not modify the model (copy it first)."""
    return overfit()


@pytest.fixture(scope="session")
def overfit_checkpoint(overfit_tiny, tmp_path_factory):
    model, tokenizer, _ = overfit_tiny
    path = tmp_path_factory.mktemp("overfit") / "ckpt"
    save_checkpoint(path, model, tokenizer)
    return path
