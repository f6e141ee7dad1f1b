"""The FANformer configuration: one validated dataclass, its presets and JSON round trip.

Every knob of docs/architecture.md lives here; derived widths (the FAN periodic
and plain branch widths, CoLA ranks) are properties so they can never disagree with
the fields they come from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fanformer.errors import FANformerError

NORM_SCHEMES = ("pre", "hybrid")
FAN_ACTIVATIONS = ("identity", "gelu")
HEADS = ("linear", "fourier")
MIXERS = ("attention", "fftnet")
MAX_ROPE_THETA = 1e12  # RoPE bases in use are 1e4 to a few 1e6; far above that a config.json is damaged


def knob(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its description (the CLI shows it in --help) and, where the
    values are a fixed set, its choices (the CLI offers and checks them)."""
    return field(default=default, metadata={"help": help, **({"choices": tuple(choices)} if choices else {})})


@dataclass
class FANformerConfig:
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 192
    p: float = knob(0.25, "periodicity ratio: d_p = floor(d_model * p); 0 = plain Transformer")
    fan_activation: str = knob("identity", "on the plain branch G: identity (FANLayer') or gelu (full FAN)")
    norm: str = knob("pre", "pre (pre-norm everywhere) or hybrid (HybridNorm*)")
    cola_rank: float = knob(0.0, "CoLA rank as a fraction of each layer's input width (0.25 = in/4); 0 = off")
    cola_lm_head: bool = knob(False, "CoLA on the LM head too (the seed card does)")
    gated_residual: bool = knob(False, "x + sigmoid(g) * f(x) with a learned per-channel gate g")
    dropout: float = 0.0
    rope_theta: float = 10000.0
    max_seq_len: int = 128
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    head: str = knob("linear", "LM head: linear, or fourier (Fourier Head, arXiv 2410.22269: the vocabulary "
                     "as ordered bins on [-1, 1], for numeric tokens)")
    fourier_frequencies: int = knob(16, "Fourier head: frequencies N of its density")
    fourier_reg: float = knob(1e-4, "Fourier head: weight of its smoothness penalty in the training loss")
    mixer: str = knob("attention", "token mixer: attention (ATF), or fftnet (causal FFTNet, arXiv 2502.18394; "
                      "no KV cache, decoding recomputes the prefix)")

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise FANformerError("invalid model config: " + "; ".join(problems))

    def _problems(self):
        # Types first: a config.json value of the wrong type (a list, a string, null) must be
        # reported, not raise TypeError from a comparison below.
        wrong = list(self._type_problems())
        if wrong:
            yield from wrong
            return
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len", "fourier_frequencies"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                yield f"{name} must be a positive integer, got {value!r}"
        if isinstance(self.n_heads, int) and isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0:
            if self.n_heads % self.n_kv_heads:
                yield (f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                       f"({self.n_kv_heads}) for grouped-query attention")
        if isinstance(self.head_dim, int) and self.head_dim % 2:
            yield f"head_dim must be even for RoPE, got {self.head_dim}"
        if not 0.0 <= self.p < 0.5:
            yield f"p must be in [0, 0.5), got {self.p} (0 = plain Transformer, 0.25 = the paper's default)"
        if self.fan_activation not in FAN_ACTIVATIONS:
            yield f"fan_activation must be one of {FAN_ACTIVATIONS}, got {self.fan_activation!r}"
        if self.norm not in NORM_SCHEMES:
            yield f"norm must be one of {NORM_SCHEMES}, got {self.norm!r}"
        if not 0.0 <= self.cola_rank <= 1.0:
            yield f"cola_rank is a fraction of the input width in [0, 1] (0 = off), got {self.cola_rank}"
        if self.cola_lm_head and self.cola_rank == 0:
            yield "cola_lm_head needs cola_rank > 0"
        if self.tie_embeddings and self.cola_lm_head:
            yield "tie_embeddings cannot be combined with a CoLA LM head"
        if not 0.0 <= self.dropout < 1.0:
            yield f"dropout must be in [0, 1), got {self.dropout}"
        # Bounded, not only positive: an integer of 30 digits in a damaged config.json passes
        # "positive" and then overflows torch's float maths.
        if not 0 < self.rope_theta <= MAX_ROPE_THETA:
            yield f"rope_theta must be in (0, {MAX_ROPE_THETA:g}], got {self.rope_theta!r}"
        if not 0 < self.norm_eps < 1:
            yield f"norm_eps must be in (0, 1), got {self.norm_eps!r}"
        if self.head not in HEADS:
            yield f"head must be one of {HEADS}, got {self.head!r}"
        if self.mixer not in MIXERS:
            yield f"mixer must be one of {MIXERS}, got {self.mixer!r}"
        if not self.fourier_reg >= 0:
            yield f"fourier_reg must be >= 0, got {self.fourier_reg}"
        if self.head == "fourier":
            if self.tie_embeddings:
                yield "head fourier has no weight to tie to the embedding: set tie_embeddings false"
            if self.cola_lm_head:
                yield "cola_lm_head applies to the linear head only, not head fourier"
            if isinstance(self.fourier_frequencies, int) and isinstance(self.vocab_size, int) \
                    and self.fourier_frequencies > self.vocab_size // 2:
                yield (f"fourier_frequencies ({self.fourier_frequencies}) must be at most vocab_size / 2 "
                       f"({self.vocab_size // 2}): higher frequencies alias between the bin centres")

    def _type_problems(self):
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    yield f"{f.name} must be a finite number, got {value!r}"
            elif kind is not int and not isinstance(value, kind):  # ints: checked with their range below
                yield f"{f.name} must be a {kind.__name__}, got {value!r}"

    def check_sizes(self, n_bytes: int, source) -> None:
        """Every width and count against the size of the file the weights come from: each is
        the extent of at least one stored tensor, so none can exceed the file's byte count (a
        damaged config.json or GGUF header claiming millions of layers is refused before a
        model of that size is built). max_seq_len sizes a weight only in the FFTNet mixer."""
        sized = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                 "fourier_frequencies"] + (["max_seq_len"] if self.mixer == "fftnet" else [])
        for name in sized:
            if getattr(self, name) > n_bytes:
                raise FANformerError(f"{source}: {name} is {getattr(self, name):,}, more than the "
                                     f"{n_bytes:,} bytes of weights it would size; the value is damaged")

    # Derived widths -----------------------------------------------------------
    @property
    def d_periodic(self) -> int:
        """d_p: width of cos(P) and of sin(P) each."""
        return math.floor(self.d_model * self.p)

    @property
    def d_plain(self) -> int:
        """d_g = d - 2 d_p, so that [cos P || sin P || G] has width d_model."""
        return self.d_model - 2 * self.d_periodic

    @property
    def has_fan(self) -> bool:
        return self.d_periodic > 0

    def cola_rank_for(self, in_features: int) -> int:
        """The CoLA rank of a layer with this input width (0 when CoLA is off)."""
        if self.cola_rank == 0:
            return 0
        return max(1, round(in_features * self.cola_rank))

    # Serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FANformerConfig":
        """Build from a dict; keys that are not config fields (e.g. transformers'
        bookkeeping in config.json) are ignored."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FANformerConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FANformerError(f"config is not valid JSON ({err}); re-export the checkpoint") from None
        except RecursionError:
            raise FANformerError("config JSON nests too deeply to read; re-export the checkpoint") from None
        if not isinstance(data, dict):
            raise FANformerError("config JSON must be an object of config fields")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "FANformerConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FANformerError(f"no config at {path}: expected a checkpoint directory with config.json")
        from fanformer.validate import read_json

        data = read_json(path)
        try:
            return cls.from_dict(data)
        except FANformerError as err:
            raise FANformerError(f"{path}: {err}") from None

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "FANformerConfig":
        if name not in PRESETS:
            raise FANformerError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **overrides: Any) -> "FANformerConfig":
        return dataclasses.replace(self, **overrides)


def _paper(d: int, layers: int, heads: int) -> dict[str, Any]:
    """The FANformer paper's OLMo-style sizes: SwiGLU width 4d, p = 0.25, pre-norm, tied."""
    return dict(vocab_size=50304, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                head_dim=d // heads, ffn_dim=4 * d, max_seq_len=2048, p=0.25, norm="pre",
                tie_embeddings=True)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_dim=192, max_seq_len=128, p=0.25, norm="pre"),
    "small": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32,
                  ffn_dim=768, max_seq_len=512, p=0.25, norm="pre"),
    # The seed card's model: hidden 768 with 12 heads as in its code (its prose says 512).
    "seed-92m": dict(vocab_size=49152, d_model=768, n_layers=12, n_heads=12, n_kv_heads=6,
                     head_dim=64, ffn_dim=2048, max_seq_len=1024, p=0.15, norm="hybrid",
                     cola_rank=0.25, cola_lm_head=True, gated_residual=True, dropout=0.1),
    "paper-300m": _paper(1024, 16, 16),
    "paper-600m": _paper(1536, 16, 16),
    "paper-1b": _paper(2048, 16, 16),
    "paper-3b": _paper(2560, 24, 20),
}
