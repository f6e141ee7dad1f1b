"""The Fourier Head against a linear head on a continuous target (arXiv 2410.22269, Sec. 4.1).

The synthetic task of the paper's toy experiment: predict the distribution of a value
y in [-1, 1], binned into 64 classes, from a conditioning input x in [-1, 1]^2. The
target is a two-component Gaussian mixture whose means and weight move with x:

    mu_1 = -0.45 + 0.25 x_1,  mu_2 = 0.35 + 0.3 x_2,  sigma = (0.10, 0.07),
    w_1 = 0.5 + 0.2 x_1 x_2,  truncated to [-1, 1].

Both models are the same MLP trunk (2 -> 64 -> 64, GELU; same initial weights) with a
different head on its features: nn.Linear(64, 64), or fanformer.fourier_head.FourierHead
(the module `head: fourier` uses) with its smoothness penalty in the loss. Each trains
with cross-entropy on the same samples (one draw of y per x) in the same order, and is
scored on held-out x against the exact binned mixture:

    KL      mean KL(target || predicted) over the test inputs (lower is better)
    smooth  the paper's smoothness metric (its Sec. 4.1 and smoothness_metric.py):
            sum over sigma = 1..100 of 6 / (pi^2 sigma^2) ||q - G_sigma * q||_2, G_sigma a
            circular Gaussian filter; lower is smoother (the target's own value is shown)

    python benchmarks/fourier_head.py                        # table + fourier_head.png
    python benchmarks/fourier_head.py --frequencies 16 --reg 1e-3 --samples 2000 --seeds 3

Nothing here asserts a result: it prints what it measures.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fanformer.fourier_head import FourierHead, bin_centres

BINS = 64
WIDTH = 64


# --- The task ------------------------------------------------------------------

def mixture(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means (n, 2), standard deviations (2,) and weights (n, 2) of the target mixture at x (n, 2)."""
    means = np.stack([-0.45 + 0.25 * x[:, 0], 0.35 + 0.3 * x[:, 1]], axis=1)
    w1 = 0.5 + 0.2 * x[:, 0] * x[:, 1]
    return means, np.array([0.10, 0.07]), np.stack([w1, 1 - w1], axis=1)


def target_pmf(x: np.ndarray) -> np.ndarray:
    """The exact binned mixture on [-1, 1] (renormalised for the truncation), (n, BINS)."""
    means, sigmas, weights = mixture(x)
    edges = np.linspace(-1, 1, BINS + 1)
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1 + erf((edges[None, None, :] - means[:, :, None]) / (sigmas[None, :, None] * math.sqrt(2))))
    mass = (weights[:, :, None] * np.diff(cdf, axis=-1)).sum(1)  # (n, BINS)
    return mass / mass.sum(-1, keepdims=True)


def sample_bins(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One y per x from the truncated mixture, as its bin index."""
    means, sigmas, weights = mixture(x)
    out = np.empty(len(x), dtype=np.int64)
    for i in range(len(x)):
        while True:
            comp = rng.random() >= weights[i, 0]
            y = rng.normal(means[i, int(comp)], sigmas[int(comp)])
            if -1 <= y < 1:
                break
        out[i] = min(BINS - 1, int((y + 1) / 2 * BINS))
    return out


# --- Metrics -------------------------------------------------------------------

def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in nats (0 log 0 = 0)."""
    safe = np.where(p > 0, p, 1.0)
    return (p * (np.log(safe) - np.log(q))).sum(-1)


def smoothness(q: np.ndarray, sigmas=range(1, 101)) -> np.ndarray:
    """The paper's L2 smoothness per row: sum_sigma 6/(pi^2 sigma^2) ||q - G_sigma q||_2,
    G_sigma a Gaussian filter of radius m - 1 with wrap-around (scipy's gaussian_filter1d,
    mode="wrap", written out as a circulant matrix)."""
    m = q.shape[-1]
    offsets = np.arange(-(m - 1), m)
    total = np.zeros(len(q))
    for sigma in sigmas:
        w = np.exp(-0.5 * (offsets / sigma) ** 2)
        w /= w.sum()
        circulant = np.zeros((m, m))
        rows = np.repeat(np.arange(m), len(offsets))
        np.add.at(circulant, (rows, (rows + np.tile(offsets, m)) % m), np.tile(w, m))
        total += 6 / (math.pi ** 2 * sigma ** 2) * np.linalg.norm(q - q @ circulant.T, axis=-1)
    return total


# --- Models --------------------------------------------------------------------

class Model(nn.Module):
    def __init__(self, head: str, frequencies: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(2, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU())
        if head == "fourier":
            self.head = FourierHead(WIDTH, BINS, frequencies)
            self.head.reset_parameters()
        else:
            self.head = nn.Linear(WIDTH, BINS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (n, BINS) and the smoothness penalty (0 for the linear head)."""
        h = self.trunk(x)
        if isinstance(self.head, FourierHead):
            return self.head(h, return_penalty=True)
        return F.log_softmax(self.head(h), dim=-1), torch.zeros(())


def train(head: str, x: np.ndarray, y: np.ndarray, args, seed: int) -> Model:
    torch.manual_seed(seed)
    trunk = Model("linear", args.frequencies).trunk.state_dict()  # the same trunk for both heads
    model = Model(head, args.frequencies)
    model.trunk.load_state_dict(trunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(xt), generator=order).split(args.batch_size):
            log_q, penalty = model(xt[batch])
            loss = F.nll_loss(log_q, yt[batch]) + (args.reg if head == "fourier" else 0.0) * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: Model, x: np.ndarray) -> np.ndarray:
    return model(torch.tensor(x, dtype=torch.float32))[0].exp().double().numpy()


def plot(path: Path, x: np.ndarray, target: np.ndarray, predictions: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = bin_centres(BINS).numpy()
    fig, axes = plt.subplots(1, len(x), figsize=(4.2 * len(x), 3.4), sharey=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.bar(centres, target[i], width=2 / BINS, color="0.8", label="target (binned mixture)")
        for (name, q), style in zip(predictions.items(), ("C3-", "C0-")):
            ax.plot(centres, q[i], style, lw=1.5, label=f"{name} head")
        ax.set_title(f"x = ({x[i, 0]:+.2f}, {x[i, 1]:+.2f})")
        ax.set_xlabel("y (bin centre)")
    np.atleast_1d(axes)[0].set_ylabel("probability")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frequencies", type=int, default=12, help="Fourier head frequencies N (default 12)")
    parser.add_argument("--reg", type=float, default=1e-4, help="smoothness penalty weight (default 1e-4)")
    parser.add_argument("--samples", type=int, default=4000, help="training pairs (x, one y draw) (default 4000)")
    parser.add_argument("--test", type=int, default=1000, help="held-out inputs (default 1000)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="repeat with this many seeds (default 3)")
    parser.add_argument("--out", default="fourier_head.png", help="plot of target vs both heads (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the models are tiny: more threads only spin

    results = {"linear": [], "fourier": []}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        x_train = rng.uniform(-1, 1, (args.samples, 2))
        y_train = sample_bins(x_train, rng)
        x_test = rng.uniform(-1, 1, (args.test, 2))
        target = target_pmf(x_test)
        predictions = {head: predict(train(head, x_train, y_train, args, seed), x_test) for head in results}
        for head, q in predictions.items():
            results[head].append((kl_divergence(target, q).mean(), smoothness(q).mean()))
        if seed == 0:
            shown = x_test[:3]
            plot(Path(args.out), shown, target[:3], {h: q[:3] for h, q in predictions.items()})
    target_smooth = smoothness(target_pmf(np.random.default_rng(0).uniform(-1, 1, (args.test, 2)))).mean()

    print(f"{BINS} bins, {args.samples} training samples, {args.epochs} epochs, {args.seeds} seed(s); "
          f"fourier: N = {args.frequencies}, reg = {args.reg:g}")
    print(f"{'head':<10}{'KL(target || head)':>22}{'smoothness':>16}")
    for head, rows in results.items():
        kl, smooth = np.array(rows).T
        print(f"{head:<10}{kl.mean():>14.4f} ± {kl.std():<6.4f}{smooth.mean():>10.4f} ± {smooth.std():.4f}")
    print(f"{'target':<10}{'':>22}{target_smooth:>10.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
