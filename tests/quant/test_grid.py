"""quant/grid.py against hand computations of the GPTQ min-max grid."""

import torch

from fanformer.quant import grid

FP16_4_3 = 1.333984375  # 4/3 rounded UP to fp16 (nearest is 1.3330078125, which would not cover the range)


def test_asymmetric_grid_by_hand():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    scales, zeros = grid.choose_qparams(w, bits=2, group_size=-1, sym=False)
    # range [-1, 2] in 3 steps: scale 1, zero round(1 / 1) = 1
    assert scales.tolist() == [[1.0]] and zeros.tolist() == [[1]]
    codes = grid.quantize(w, scales, zeros, 2, -1)
    assert codes.tolist() == [[0, 1, 3, 1]]  # round(0.5) = 0 (half to even), + zero 1
    assert grid.dequantize(codes, scales, zeros, -1).tolist() == [[-1.0, 0.0, 2.0, 0.0]]


def test_symmetric_grid_by_hand():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    scales, zeros = grid.choose_qparams(w, bits=2, group_size=-1, sym=True)
    # range [-2, 2] in 3 steps: scale 4/3 (rounded up to fp16), zero (3 + 1) / 2 = 2
    assert scales.tolist() == [[FP16_4_3]] and zeros.tolist() == [[2]]
    codes = grid.quantize(w, scales, zeros, 2, -1)
    assert codes.tolist() == [[1, 2, 3, 2]]
    assert torch.allclose(grid.dequantize(codes, scales, zeros, -1), torch.tensor([[-FP16_4_3, 0, FP16_4_3, 0]]))


def test_groups_have_their_own_grid():
    w = torch.tensor([[-1.0, 2.0, -4.0, 8.0]])
    scales, zeros = grid.choose_qparams(w, bits=2, group_size=2, sym=False)
    assert scales.tolist() == [[1.0, 4.0]] and zeros.tolist() == [[1, 1]]


def test_nonnegative_group_keeps_zero_at_least_one_without_clipping():
    """v1 checkpoints cannot store zero 0: the step widens to xmax / (maxq - 1) instead."""
    w = torch.tensor([[0.0, 1.0, 7.0, 14.0]])
    scales, zeros = grid.choose_qparams(w, bits=4, group_size=-1, sym=False)
    assert zeros.tolist() == [[1]] and scales.tolist() == [[1.0]]
    codes = grid.quantize(w, scales, zeros, 4, -1)
    assert grid.dequantize(codes, scales, zeros, -1).tolist() == w.tolist()


def test_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    for sym in (True, False):
        scales, zeros = grid.choose_qparams(w, 4, 32, sym)
        deq = grid.dequantize(grid.quantize(w, scales, zeros, 4, 32), scales, zeros, 32)
        step = scales.repeat_interleave(32, dim=1)
        assert ((w - deq).abs() <= step / 2 + 1e-6).all()
        assert torch.equal(scales.half().float(), scales)  # exactly what the checkpoint's fp16 holds
