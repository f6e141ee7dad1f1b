"""CUDA paths: bf16 autocast training and cached decode on the GPU (skipped without one)."""

import numpy as np
import pytest
import torch

from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.training import Dist, TrainConfig, optimizer_step, param_groups

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_step_matches_fp32_cpu_step():
    config = FANformerConfig.from_name("tiny", norm="hybrid", cola_rank=0.25, gated_residual=True)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=4096)
    starts = np.arange(4) * 129
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = FANformer(config).to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=device == "cuda")
        train = TrainConfig(batch_size=4)
        losses[device] = [optimizer_step(model, model, optimizer, tokens, starts, 128, train, Dist(),
                                         torch.device(device))[0].item() for _ in range(3)]
    # bf16 autocast on CUDA against fp32 on the CPU: the same losses to bf16 precision.
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-2)
    assert losses["cuda"][-1] < losses["cuda"][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decode_on_cuda(dtype):
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", norm="hybrid")).to("cuda", dtype).eval()
    x = torch.randint(0, 512, (2, 10), device="cuda")
    with torch.no_grad():
        reference = model(x).float()
        cache = model.new_cache()
        steps = [model(x[:, :6], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.cat(steps, 1).float(), reference, atol=tol, rtol=tol)
