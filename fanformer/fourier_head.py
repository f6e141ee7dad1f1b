"""The Fourier Head (Gillman et al. 2024, "Fourier Head: Helping Large Language Models
Learn Complex Probability Distributions", arXiv 2410.22269), as the LM head over ordered
bins: token id i is bin i of the vocabulary's m = vocab_size equal bins on [-1, 1].

    a = W h + w                              N+1 complex coefficients a_0..a_N (2(N+1) reals)
    c_k = sum_l a_{l+k} conj(a_l)            their autocorrelation, k = 0..N
    p(z) = 1/2 + Re sum_{k=1..N} (c_k / c_0) exp(i pi k z)
    q_i = p(b_i) / sum_j p(b_j)              at the bin centres b_i = -1 + (2i + 1) / m

The autocorrelation makes p = |A(z)|^2 / (2 c_0) with A(z) = sum_l a_l exp(i pi l z)
(Fejer-Riesz), so the density is non-negative and integrates to 1 on [-1, 1] whatever the
linear layer outputs. The head evaluates p in that factored form: the same numbers as
the series (the tests check it), but non-negative in any floating point and with a
rounding error that vanishes where p does, so log p stays stable at near-empty bins
(the series form loses ~1e-8 absolute to cancellation, 1e-3 in log p near the floor).
The head returns log q, so cross-entropy, sampling and perplexity use it like logits.

The smoothness regulariser is the paper's sum_k k^2 |c_k|^2 weighting, taken on the
normalised coefficients c_k / c_0 that define the density (the paper's code takes the
raw c_k, which also shrinks |a|; the density does not depend on that scale):

    R = pi^2 sum_{k=1..N} k^2 |c_k / c_0|^2 = integral_{-1}^{1} p'(z)^2 dz

Everything is real arithmetic (cos/sin tables, matmuls), so the head exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# The density is floored at this value before the log: a bin where p = 0 would give
# log 0 = -inf. With the mean density 1/2 the floor moves about 2e-4 of the mass to
# uniform, at any vocab size (the paper's code adds 1e-5 to the probabilities instead,
# a density floor of 5e-6 m for m bins: 3e-4 at m = 64). It also bounds how much fp32
# rounding of a near-zero density moves its log: about 1e-8 / 1e-4.
DENSITY_FLOOR = 1e-4


# c_0 = sum |a_l|^2 is 0 only when every a_l is (then every c_k is 0 too): the clamp turns
# 0/0 into 0, and the floor alone makes the bins uniform.
C0_MIN = 1e-30


# --- Pure functions ----------------------------------------------------------------

def bin_centres(num_bins: int, device=None) -> torch.Tensor:
    """b_i = -1 + (2i + 1) / m: the centres of m equal bins on [-1, 1], (m,) in fp64."""
    return -1 + (2 * torch.arange(num_bins, dtype=torch.float64, device=device) + 1) / num_bins


def fourier_tables(num_frequencies: int, points: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(pi k z), sin(pi k z) for k = 0..N at the points z: two (N+1, len(z)) tables."""
    k = torch.arange(num_frequencies + 1, dtype=torch.float64, device=points.device)
    angles = math.pi * k[:, None] * points.to(torch.float64)[None, :]  # (N+1, m)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def autocorrelation(a_re: torch.Tensor, a_im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_k = sum_l a_{l+k} conj(a_l) for k = 0..N, from a = a_re + i a_im (..., N+1).

    Real and imaginary parts (..., N+1) each; c_0 = sum |a_l|^2 is real and positive
    unless a = 0. Computed as sums along the diagonals of the outer product a conj(a)^T.
    """
    n = a_re.shape[-1]
    j, l = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    # diagonals[k, j*n + l] = 1 where j - l = k: sums the k-th sub-diagonal of an (n, n) matrix.
    diagonals = (j - l == torch.arange(n)[:, None, None]).flatten(1).to(a_re.dtype).to(a_re.device)  # (n, n*n)
    re = a_re[..., :, None] * a_re[..., None, :] + a_im[..., :, None] * a_im[..., None, :]  # (..., n, n)
    im = a_im[..., :, None] * a_re[..., None, :] - a_re[..., :, None] * a_im[..., None, :]  # (..., n, n)
    return re.flatten(-2) @ diagonals.T, im.flatten(-2) @ diagonals.T  # (..., n) each


def series_density(c_re: torch.Tensor, c_im: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The paper's p(z) = 1/2 + Re sum_{k>=1} (c_k / c_0) exp(i pi k z) at the tables' points, (..., m).

    c_re, c_im (..., N+1) are the autocorrelation; cos, sin (N+1, m) from `fourier_tables`.
    """
    c0 = c_re[..., :1].clamp(min=C0_MIN)
    return 0.5 + (c_re[..., 1:] / c0) @ cos[1:] - (c_im[..., 1:] / c0) @ sin[1:]  # Re((x + iy)(cos + i sin))


def factored_density(a_re: torch.Tensor, a_im: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same p(z) as |A(z)|^2 / (2 c_0), A(z) = sum_l a_l exp(i pi l z), c_0 = sum_l |a_l|^2.

    a_re, a_im (..., N+1) the coefficients; cos, sin (N+1, m) -> (..., m).
    """
    re = a_re @ cos - a_im @ sin  # Re A(z)
    im = a_re @ sin + a_im @ cos  # Im A(z)
    c0 = (a_re ** 2 + a_im ** 2).sum(-1, keepdim=True).clamp(min=C0_MIN)
    return (re ** 2 + im ** 2) / (2 * c0)


def smoothness_penalty(c_re: torch.Tensor, c_im: torch.Tensor) -> torch.Tensor:
    """R = pi^2 sum_k k^2 |c_k / c_0|^2 = integral of p'(z)^2 over [-1, 1], per position (...)."""
    c0 = c_re[..., :1].clamp(min=C0_MIN)
    k = torch.arange(1, c_re.shape[-1], device=c_re.device, dtype=c_re.dtype)
    return math.pi ** 2 * ((k ** 2) * ((c_re[..., 1:] / c0) ** 2 + (c_im[..., 1:] / c0) ** 2)).sum(-1)


def bin_log_probs(density: torch.Tensor) -> torch.Tensor:
    """log q_i = log of the floored density at the bin centres, normalised over the bins."""
    return torch.log_softmax(torch.log(density + DENSITY_FLOOR), dim=-1)


# --- Module ------------------------------------------------------------------------

class FourierHead(nn.Module):
    """(B, T, d) hidden states -> (B, T, m) log-probabilities of m ordered bins."""

    def __init__(self, in_features: int, num_bins: int, num_frequencies: int):
        super().__init__()
        self.in_features, self.num_bins, self.num_frequencies = in_features, num_bins, num_frequencies
        self.proj = nn.Linear(in_features, 2 * (num_frequencies + 1), bias=True)  # [Re a || Im a]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A near-uniform start: a_0 = 1 from the bias and small input-dependent a_k, so
        c_k / c_0 starts small (a zero-logit linear head starts uniform too)."""
        std = 0.1 / math.sqrt(self.in_features)
        nn.init.trunc_normal_(self.proj.weight, std=std, a=-3 * std, b=3 * std)
        self.proj.bias.zero_()
        self.proj.bias[0] = 1.0

    def coefficients(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_0..a_N for hidden states h: real and imaginary parts (B, T, N+1), fp32 or fp64."""
        a = self.proj(h)  # (B, T, 2(N+1))
        if a.dtype != torch.float64:
            a = a.float()
        return a[..., :self.num_frequencies + 1], a[..., self.num_frequencies + 1:]

    def forward(self, h: torch.Tensor, return_penalty: bool = False):
        """log q (B, T, m) in h's dtype; with return_penalty also the mean smoothness penalty R."""
        if torch.is_autocast_enabled(h.device.type):
            # The head is small: keep the coefficients and the density in fp32 (bf16 keeps ~3 digits).
            with torch.autocast(h.device.type, enabled=False):
                return self.forward(h.float(), return_penalty)
        a_re, a_im = self.coefficients(h)  # (B, T, N+1) each
        # The tables are functions of the config, not weights: made here (cos/sin of an
        # (N+1, m) grid, small beside the matmuls), never stored in checkpoints.
        cos, sin = fourier_tables(self.num_frequencies, bin_centres(self.num_bins, h.device), a_re.dtype)
        density = factored_density(a_re, a_im, cos, sin)  # (B, T, m)
        log_probs = bin_log_probs(density).to(h.dtype)
        if return_penalty:
            return log_probs, smoothness_penalty(*autocorrelation(a_re, a_im)).mean()
        return log_probs
