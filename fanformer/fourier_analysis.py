"""Fourier features of number tokens (Zhou et al. 2024, "Pre-trained Large Language
Models Use Fourier Features to Compute Addition", arXiv 2406.03445).

The paper stacks the representations of the numbers 0..N (token embeddings, or the
hidden state at a layer) into a matrix X of shape (N + 1, d), takes the discrete
Fourier transform along the number axis, and finds the magnitude concentrated at a
few frequencies k: periods T = (N + 1) / k of 2, 2.5, 5 and 10 in pre-trained models.

Here, for a checkpoint:

- **Number tokens** are the tokens whose string is exactly "0", "1", ..., "N": the
  longest run starting at 0 (or 0..`max_number`). A byte-level BPE tokenizer usually
  has only a few ("0".."9" and some merges); the `fanformer experiment modular`
  tokenizers have 0..112 and 0..300.
- **Representations**: the rows of the input embedding, and with `layers=True` the
  residual stream after every block when each number is fed alone, as a one-token
  sequence at position 0. For the modular models that is exactly the hidden state of
  the first operand `a` in `a b =` (attention is causal), so it is also the in-context
  state of a.
- **Spectrum**: X is centred over the numbers (the k = 0 term is the mean), then
  |rfft(X, axis=0)| is averaged over the d dimensions. Frequencies k = 1..floor(L/2)
  are kept (L = N + 1; higher k mirror these for real X).
- **Dominant periods** are the local maxima of that spectrum, largest first, each
  reported as T = L / k (not always an integer: period 10 over L = 113 shows up at
  k = 11, T = 10.27). Local maxima rather than the top bins, so one peak that leaks
  into its neighbours is counted once. Each comes with its magnitude over the median
  magnitude (how far it stands out of the floor: about 1x for a flat spectrum) and its
  share of the total magnitude over k >= 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fanformer.errors import FANformerError

MIN_NUMBERS = 4  # below this there is no spectrum worth the name
PLOT_FILE = "fourier.png"
JSON_FILE = "fourier.json"


# --- Pure functions ----------------------------------------------------------------

def magnitude_spectrum(x: np.ndarray) -> np.ndarray:
    """Mean |DFT| over dimensions of X (L, d) along axis 0, for k = 0..floor(L/2);
    X is centred first, so the k = 0 entry is 0."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < MIN_NUMBERS:
        raise FANformerError(f"need a (numbers, dims) matrix with at least {MIN_NUMBERS} numbers, got {x.shape}")
    centred = x - x.mean(axis=0, keepdims=True)
    return np.abs(np.fft.rfft(centred, axis=0)).mean(axis=1)  # (L // 2 + 1,)


@dataclass
class Peak:
    k: int  # frequency: cycles over the L numbers
    period: float  # L / k numbers per cycle
    magnitude: float
    share: float  # magnitude / sum of magnitudes over k >= 1
    over_median: float  # magnitude / the median magnitude over k >= 1: how far it stands out

    def to_dict(self) -> dict:
        return {"k": self.k, "period": round(self.period, 4), "magnitude": round(self.magnitude, 6),
                "share": round(self.share, 4), "over_median": round(self.over_median, 3)}


def dominant_periods(spectrum: np.ndarray, length: int, top: int = 5) -> list[Peak]:
    """The `top` largest local maxima of `spectrum` over k >= 1, as periods L / k."""
    mags = np.asarray(spectrum, dtype=np.float64)
    total = mags[1:].sum() or 1.0
    median = float(np.median(mags[1:])) or 1.0
    padded = np.concatenate([[-np.inf], mags[1:], [-np.inf]])  # the ends count as maxima when above their one neighbour
    peaks = [k for k in range(1, len(mags)) if padded[k] > padded[k - 1] and padded[k] >= padded[k + 1]]
    peaks.sort(key=lambda k: -mags[k])
    return [Peak(k, length / k, float(mags[k]), float(mags[k] / total), float(mags[k] / median))
            for k in peaks[:top]]


# --- Number tokens and representations of a checkpoint --------------------------------

def number_token_ids(tokenizer, max_number: int | None = None) -> list[int]:
    """Ids of the tokens "0", "1", ..., "N": the longest run from 0, or exactly 0..max_number."""
    ids = []
    limit = max_number if max_number is not None else tokenizer.get_vocab_size()
    for n in range(limit + 1):
        token_id = tokenizer.token_to_id(str(n))
        if token_id is None:
            if max_number is not None:
                raise FANformerError(f"the tokenizer has no token for the number {n}, so 0..{max_number} are not "
                                     f"all single tokens; use --max-number {n - 1} or less")
            break
        ids.append(token_id)
    if len(ids) < MIN_NUMBERS:
        raise FANformerError(f"the tokenizer has single tokens for 0..{len(ids) - 1} only; the analysis needs the "
                             f"numbers 0..{MIN_NUMBERS - 1} at least (train with a number vocabulary, e.g. "
                             "`fanformer experiment modular`)")
    return ids


@torch.no_grad()
def number_representations(model, token_ids: list[int], layers: bool = False) -> dict[str, np.ndarray]:
    """{"embedding": (L, d)} and with `layers` {"layer 1": (L, d), ...}: the residual
    stream after each block for each number fed alone at position 0."""
    ids = torch.tensor(token_ids, device=model.embed.weight.device)
    found = {"embedding": model.embed.weight[ids].float().cpu().numpy()}
    if layers:
        states: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda _m, _i, output: states.append(output))
                 for block in model.blocks]
        try:
            model(ids[:, None])  # (L, 1): each number its own sequence
        finally:
            for hook in hooks:
                hook.remove()
        for i, state in enumerate(states):
            found[f"layer {i + 1}"] = state[:, 0].float().cpu().numpy()  # (L, d)
    return found


def analyze(representations: dict[str, np.ndarray], top: int = 5) -> dict:
    """Spectrum and dominant periods of each representation."""
    result = {}
    for name, x in representations.items():
        spectrum = magnitude_spectrum(x)
        result[name] = {"spectrum": [round(float(v), 6) for v in spectrum],
                        "peaks": [p.to_dict() for p in dominant_periods(spectrum, len(x), top)]}
    return result


def analyze_checkpoint(path: str | Path, max_number: int | None = None, layers: bool = False,
                       top: int = 5) -> dict:
    """Load a checkpoint and analyse its number tokens (see the module docstring)."""
    from fanformer.checkpoint import load_model
    from fanformer.tokenizer import load_tokenizer

    if top < 1:
        raise FANformerError(f"--top must be at least 1, got {top}")
    model = load_model(path)
    ids = number_token_ids(load_tokenizer(path), max_number)
    representations = number_representations(model, ids, layers)
    return {"checkpoint": str(path), "numbers": [0, len(ids) - 1], "length": len(ids),
            "representations": analyze(representations, top)}


# --- Report ---------------------------------------------------------------------------

def format_analysis(result: dict) -> str:
    lines = [f"{result['checkpoint']}: numbers {result['numbers'][0]}..{result['numbers'][1]} "
             f"(L = {result['length']}); dominant periods L/k, each with its magnitude over the median "
             "magnitude (a flat spectrum gives about 1x)"]
    width = max(len(name) for name in result["representations"])
    for name, entry in result["representations"].items():
        peaks = "  ".join(f"{p['period']:>6.4g} ({p['over_median']:.1f}x)" for p in entry["peaks"])
        lines.append(f"{name:<{width}}  {peaks}")
    return "\n".join(lines)


def plot_spectra(result: dict, path: Path) -> None:
    """Magnitude against frequency k, one line per representation, top peaks labelled by period."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = result["representations"]
    fig, axes = plt.subplots(len(reps), 1, figsize=(8, 2.2 * len(reps) + 0.6), squeeze=False, sharex=True)
    for ax, (name, entry) in zip(axes[:, 0], reps.items()):
        spectrum = np.array(entry["spectrum"])
        ax.bar(np.arange(1, len(spectrum)), spectrum[1:], width=0.8, color="tab:blue")
        for peak in entry["peaks"][:3]:
            ax.annotate(f"T={peak['period']:.3g}", (peak["k"], peak["magnitude"]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8, color="tab:red")
        ax.set_ylabel("mean |DFT|")
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"frequency k (period = {result['length']} / k)")
    fig.suptitle(f"{Path(result['checkpoint']).name}: numbers {result['numbers'][0]}..{result['numbers'][1]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def save_analysis(result: dict, out: str | Path) -> list[Path]:
    """Write fourier.png and fourier.json into the folder `out` (each file replaced
    atomically; they are derived from the checkpoint, so an old pair is overwritten)."""
    from fanformer.outputs import write_file_atomically

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FANformerError(f"--out {out} is a file; give a folder for {PLOT_FILE} and {JSON_FILE}")
    return [write_file_atomically(out / PLOT_FILE, lambda path: plot_spectra(result, path)),
            write_file_atomically(out / JSON_FILE, lambda path: path.write_text(json.dumps(result, indent=2)))]
