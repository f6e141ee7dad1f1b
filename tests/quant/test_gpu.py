"""GPTQ and QuantLinear on a CUDA device (skipped without one)."""

import copy

import pytest
import torch

from fanformer.config import FANformerConfig
from fanformer.model import FANformer
from fanformer.quant import GPTQConfig, QuantLinear, quantize
from fanformer.quant.packing import pack_dim0, unpack_dim0

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_on_gpu(bits):
    codes = torch.randint(0, 2**bits, (96, 64), dtype=torch.int32, device="cuda")
    assert torch.equal(unpack_dim0(pack_dim0(codes, bits), bits), codes)


def test_gptq_on_gpu_runs_and_matches_cpu_forward():
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name("tiny", cola_rank=0.25)).cuda().eval()
    calibration = torch.randint(0, model.config.vocab_size, (16, 64), device="cuda")
    report = quantize(model, GPTQConfig(bits=4, group_size=-1, act_order=True, calib_samples=16, calib_seq_len=64),
                      calibration, progress=False)
    layer = model.get_submodule(next(iter(report["layers"])))
    assert isinstance(layer, QuantLinear) and layer.qweight.is_cuda
    ids = calibration[:2]
    with torch.no_grad():
        on_gpu = model(ids).cpu()
        on_cpu = copy.deepcopy(model).cpu()(ids.cpu())
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
