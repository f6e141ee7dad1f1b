"""A causal FFTNet token mixer (Fein-Ashley 2025, "The FFT Strikes Back: An Efficient
Alternative to Self-Attention", arXiv 2502.18394), for a decoder.

FFTNet mixes tokens in O(n log n): an FFT over the sequence, a learnable spectral filter
W + dW(c) modulated by an MLP of a context vector c (the mean of all tokens), modReLU,
an inverse FFT. As published it is not causal: the FFT is circular (the last tokens wrap
around onto the first), the context mean sees every token, and a pointwise nonlinearity
on the spectrum makes every output depend on every input. This module is its causal form;
output t depends on inputs 1..t only, exactly (tests/fanformer/test_fftnet.py perturbs a
future token and checks that earlier outputs do not move):

1. Causal spectral filter. The filter is the spectrum of a learned kernel h with taps at
   lags 0..max_seq_len-1 only, zero-padded to n = 2T:
       y = irfft(rfft(u, n) * rfft(h, n))[:T]   <=>   y_t = sum_{s <= t} h_{t-s} u_s,
   the linear convolution (n = 2T leaves nothing to wrap around), causal by construction.
2. Causal context. c_t is the running mean of tokens 1..t (real tokens only) instead of
   the mean of all. A different filter per position cannot be one FFT, so the modulation
   dW(c) is restricted to a learned basis of R causal filters:
       W_t(f) = H_0(f) + sum_r g_{t,r} H_r(f),   g_t = MLP(c_t)  (per channel),
   i.e. y_t = (h_0 * u)_t + sum_r g_{t,r} (h_r * u)_t: R + 1 FFT convolutions, and every
   term uses tokens <= t.
3. modReLU after the inverse FFT. modReLU(z) = ReLU(|z| + b) z / |z| is applied per
   position to the filtered (real) signal, where it is sign(z) ReLU(|z| + b): a learned
   per-channel dead zone. Applied to the spectrum, as in the paper, it would leak the
   future into every output.

Padding: masked (left-pad) positions are zeroed and left out of the running mean, and
the filter is time-invariant, so a left-padded row gives its real tokens exactly the
outputs of the unpadded row. Decoding: the convolution needs every past value, so the
cache of a layer is its value history u_1..u_S (fanformer.model.FFTNetMixer keeps it in
the KV-cache slots) and a step filters it again, O(S log S) per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# R: the basis filters whose per-position mix the context MLP sets (the rank of dW(c)).
MODULATION_RANK = 2


# --- Pure functions ----------------------------------------------------------------

def causal_fft_conv(u: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """y[b, t, k, c] = sum_{s <= t} kernels[k, c, t - s] u[b, s, c], by zero-padded FFT.

    u (B, T, C), kernels (K, C, L) -> (B, T, K, C) in u's dtype; lags >= L count as 0.
    The FFT length n = 2T leaves room for every lag 0..T-1, so the FFT's circular
    convolution is the linear one on the first T outputs. The FFTs run in fp32, or fp64
    for fp64 input (torch.fft has no bf16).
    """
    T = u.shape[1]
    n = 2 * T
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.rfft(u.to(work).transpose(1, 2), n=n)  # (B, C, T+1)
    spectral_filter = torch.fft.rfft(kernels[..., :T].to(work), n=n)  # (K, C, T+1)
    y = torch.fft.irfft(spectral_product(spectrum, spectral_filter), n=n)[..., :T]  # (B, K, C, T)
    return y.permute(0, 3, 1, 2).to(u.dtype)


def spectral_product(spectrum: torch.Tensor, spectral_filter: torch.Tensor) -> torch.Tensor:
    """(B, C, F) x (K, C, F) complex -> (B, K, C, F).

    The ONNX exporter turns the FFTs into DFT nodes but has no complex-valued
    products, so under torch.export the product is written in real arithmetic (the
    same numbers; eager mode keeps the faster complex multiply).
    """
    if not torch.compiler.is_exporting():
        return spectrum[:, None] * spectral_filter
    s = torch.view_as_real(spectrum)[:, None]  # (B, 1, C, F, 2)
    f = torch.view_as_real(spectral_filter)  # (K, C, F, 2)
    re = s[..., 0] * f[..., 0] - s[..., 1] * f[..., 1]
    im = s[..., 0] * f[..., 1] + s[..., 1] * f[..., 0]
    return torch.view_as_complex(torch.stack([re, im], dim=-1))


def running_mean(u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """c_t = mean of u over the real tokens 1..t, (B, T, C); 0 before the first real one."""
    work = torch.float64 if u.dtype == torch.float64 else torch.float32  # sums in at least fp32
    if mask is None:
        count = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=work)[:, None]  # (T, 1)
        return (u.to(work).cumsum(1) / count).to(u.dtype)
    m = mask.to(work)[..., None]  # (B, T, 1)
    return ((u.to(work) * m).cumsum(1) / m.cumsum(1).clamp(min=1)).to(u.dtype)


def modrelu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """modReLU on real values: ReLU(|z| + b) z / |z| = sign(z) ReLU(|z| + b)."""
    return torch.sign(z) * F.relu(z.abs() + bias)


# --- Module ------------------------------------------------------------------------

class CausalSpectralFilter(nn.Module):
    """(B, T, C) values -> (B, T, C): adaptive causal spectral filter, then modReLU."""

    def __init__(self, channels: int, max_len: int, rank: int = MODULATION_RANK):
        super().__init__()
        self.channels, self.max_len, self.rank = channels, max_len, rank
        self.kernels = nn.Parameter(torch.empty(1 + rank, channels, max_len))  # h_0..h_R, (R+1, C, L)
        self.context = nn.Sequential(nn.Linear(channels, channels), nn.GELU(),
                                     nn.Linear(channels, rank * channels))  # c_t -> g_t
        self.modrelu_bias = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random kernels decaying over a per-channel time scale from 1 to L tokens (so the
        channels cover short and long range), each of unit norm so mixing keeps the
        variance; the modulation starts at 0 (the base filter alone), modReLU at identity."""
        device = self.kernels.device
        lags = torch.arange(self.max_len, device=device, dtype=torch.float32)
        scales = torch.logspace(0, math.log10(self.max_len), self.channels, device=device)[:, None]  # (C, 1)
        taps = torch.randn(self.kernels.shape, device=device) * torch.exp(-lags / scales)  # (R+1, C, L)
        self.kernels.copy_(taps / taps.norm(dim=-1, keepdim=True))
        first, last = self.context[0], self.context[2]
        std = 1 / math.sqrt(self.channels)
        nn.init.trunc_normal_(first.weight, std=std, a=-3 * std, b=3 * std)
        first.bias.zero_()
        last.weight.zero_()
        last.bias.zero_()
        self.modrelu_bias.zero_()

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None = None, new: int | None = None) -> torch.Tensor:
        """u (B, S, C) and its real-token mask (B, S) -> the outputs of the last `new`
        positions (all S by default; a decode step needs only its own), (B, T, C)."""
        B, S, C = u.shape
        T = S if new is None else new
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)  # padding contributes nothing
        context = running_mean(u, mask)[:, -T:]  # c_t, (B, T, C)
        gains = self.context(context).view(B, T, self.rank, C)  # g_t, (B, T, R, C)
        y = causal_fft_conv(u, self.kernels)[:, -T:]  # (B, T, R+1, C)
        y = y[:, :, 0] + (gains * y[:, :, 1:]).sum(2)  # filter H_0 + sum_r g_{t,r} H_r, (B, T, C)
        return modrelu(y, self.modrelu_bias.to(y.dtype))
