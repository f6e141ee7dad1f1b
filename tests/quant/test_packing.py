"""quant/packing.py: the GPTQ v1 int32 layout, exact round trips, and its conventions."""

import pytest
import torch

from fanformer.errors import FANformerError
from fanformer.quant import grid
from fanformer.quant.packing import pack, pack_dim0, unpack, unpack_dim0


def as_int32(x: int) -> int:
    return x - 2**32 if x >= 2**31 else x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_dim0_round_trip_is_exact(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 40), dtype=torch.int32)
    codes[0], codes[-1] = 0, 2**bits - 1  # both ends of the range, sign bit of the words included
    words = pack_dim0(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_dim0(words, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_layout_is_autogptq_shift_packing(bits):
    """word r holds values r*32/bits ... with value k at bit bits*k (AutoGPTQ's `|= v << bits*k`)."""
    per_word = 32 // bits
    codes = torch.randint(0, 2**bits, (2 * per_word, 3), dtype=torch.int32)
    words = pack_dim0(codes, bits)
    for r in range(2):
        for col in range(3):
            expected = sum(int(codes[r * per_word + k, col]) << (bits * k) for k in range(per_word))
            assert int(words[r, col]) == as_int32(expected)


def test_3bit_layout_straddles_words_as_autogptq():
    """32 three-bit values in 3 words: values 10 and 21 cross a word boundary."""
    codes = torch.randint(0, 8, (32, 1), dtype=torch.int32)
    v = [int(c) for c in codes[:, 0]]
    w0 = sum(v[k] << (3 * k) for k in range(10)) | ((v[10] & 0b11) << 30)
    w1 = (v[10] >> 2) | sum(v[11 + k] << (3 * k + 1) for k in range(10)) | ((v[21] & 1) << 31)
    w2 = (v[21] >> 1) | sum(v[22 + k] << (3 * k + 2) for k in range(10))
    assert pack_dim0(codes, 3)[:, 0].tolist() == [as_int32(w0), as_int32(w1), as_int32(w2)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_checkpoint_tensors_round_trip(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    scales, zeros = grid.choose_qparams(w, bits, 32, sym)
    g_idx = grid.group_index(128, 32)[torch.randperm(128)]  # act-order style g_idx
    codes = grid.quantize(w, scales, zeros, bits, 32, g_idx)
    packed = pack(codes, scales, zeros, g_idx, bits)
    assert packed["qweight"].shape == (128 * bits // 32, 64) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 64 * bits // 32) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (4, 64) and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].shape == (128,) and packed["g_idx"].dtype == torch.int32
    codes2, scales2, zeros2, g_idx2 = unpack(**packed, bits=bits)
    assert torch.equal(codes2, codes) and torch.equal(zeros2, zeros) and torch.equal(g_idx2, g_idx)
    assert torch.equal(scales2, scales)  # the grid's scales are fp16 values already


def test_qzeros_store_zero_minus_one():
    """v1 convention: symmetric 4-bit zero 8 is stored as 7 in every nibble."""
    w = torch.randn(8, 32)
    scales, zeros = grid.choose_qparams(w, 4, -1, sym=True)
    assert zeros.unique().tolist() == [8]
    packed = pack(grid.quantize(w, scales, zeros, 4, -1), scales, zeros, grid.group_index(32, -1), 4)
    assert packed["qzeros"].tolist() == [[0x77777777]]


def test_unpackable_widths_and_zero_zero_are_refused():
    with pytest.raises(FANformerError, match="multiple of 32"):
        pack_dim0(torch.zeros(20, 4, dtype=torch.int32), 3)
    codes, zeros = torch.zeros(8, 32, dtype=torch.int32), torch.zeros(8, 1, dtype=torch.int32)
    with pytest.raises(FANformerError, match="zero point of 0"):
        pack(codes, torch.ones(8, 1), zeros, grid.group_index(32, -1), 4)
