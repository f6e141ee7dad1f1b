"""One small validated config per quantization method (torchao style): the config's type
picks the handler in `quant.quantize`, and the checkpoint stores it as
`quantization_config` in config.json.

The field defaults here are the project's quantization defaults, for the library, the CLI
(each field is a `fanformer quantize` flag, with its `knob` help) and the drift table alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fanformer.config import knob
from fanformer.errors import FANformerError

BITS = (2, 3, 4, 8)  # what the GPTQ layout packs (quant/packing.py)

GROUP_SIZES = (128, 64, 32, -1)  # -1: one group per output channel

GGML_CHECKPOINT_FORMAT = "ggml"  # quantization_config.checkpoint_format of a K-grid GPTQ checkpoint
GPTQ_GRID = "gptq"  # GPTQConfig.grid: the GPTQ v1 integer layout (quant/packing.py)
# ... or a llama.cpp mixture whose base type is Q4_K: GPTQ on Q4_K's blocks (quant/gptq_k.py).
K_GRIDS = ("q4_k_m", "q4_k_s")


@dataclass(frozen=True)
class QuantConfig:
    """What every method's config shares: which layers it covers, validation, to_dict.

    keep: fnmatch patterns of module names left in float (e.g. "blocks.*.attn.fan.proj"); a
        pattern naming a module keeps every linear inside it (both factors of a CoLA layer).
    lm_head: quantize the LM head too (never when it is tied to the embedding).
    """

    keep: tuple[str, ...] = knob((), "leave matching layers in float, e.g. 'blocks.*.attn.fan.proj' (repeatable)")
    lm_head: bool = knob(False, "quantize the LM head too (not when tied)")

    method = ""  # quant_method in the checkpoint

    @property
    def own_modules(self) -> bool:
        """Whether the handler swaps in modules of its own (not `QuantLinear`s on the GPTQ grid)."""
        return False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(self.keep))
        problems = list(self._problems())
        if problems:
            raise FANformerError(f"invalid {self.method} config: " + "; ".join(problems))

    def _problems(self):
        """Each problem with the fields, as a sentence; subclasses extend it."""
        return iter(())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WeightOnlyConfig(QuantConfig):
    """What every weight-only integer method shares: the grid, besides the layers covered."""

    bits: int = knob(4, "bits per weight: 8, 4, 3 or 2")
    group_size: int = knob(128, "weights per scale: 128, 64, 32, or -1 (per channel)")
    sym: bool = field(default=True, metadata={"help": "symmetric grid; --asym: min-max with a zero point",
                                              "negation": "asym"})

    def _problems(self):
        if self.bits not in BITS:
            yield f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}"
        if self.group_size not in GROUP_SIZES:
            yield (f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} (-1 = per channel), "
                   f"got {self.group_size}")


@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest on the GPTQ grid: the baseline, no calibration data."""

    method = "rtn"


@dataclass(frozen=True)
class CalibratedConfig(WeightOnlyConfig):
    """A method that looks at activations: calibration windows from the training split."""

    calib_samples: int = knob(128, "calibration windows")
    calib_seq_len: int = knob(0, "tokens per calibration window; 0 = min(512, the model's max_seq_len)")
    seed: int = knob(0, "calibration window seed")
    batch_size: int = knob(8, "calibration windows per forward pass (memory, not results)")

    def _problems(self):
        yield from super()._problems()
        for name in ("calib_samples", "calib_seq_len", "batch_size"):
            value = getattr(self, name)
            minimum = 0 if name == "calib_seq_len" else 1  # calib_seq_len 0: see for_model
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                yield f"{name} must be an integer >= {minimum}, got {value!r}"

    def for_model(self, max_seq_len: int) -> CalibratedConfig:
        """This config with `calib_seq_len` 0 resolved against the model's context."""
        return self if self.calib_seq_len else dataclasses.replace(self, calib_seq_len=min(512, max_seq_len))


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ (Frantar et al. 2022). percdamp and blocksize are the paper's 1% and 128."""

    act_order: bool = knob(False, "columns by decreasing Hessian diagonal")
    percdamp: float = knob(0.01, "Hessian dampening, a fraction of its mean diagonal")
    blocksize: int = knob(128, "GPTQ: columns per lazy batch update; NF4: weights per block")
    grid: str = knob(GPTQ_GRID, "gptq: integers in the GPTQ layout; q4_k_m / q4_k_s: llama.cpp's blocks of that "
                                "GGUF mixture, GPTQ on Q4_K's grid (export with the same --type carries them)",
                     choices=(GPTQ_GRID,) + K_GRIDS)

    method = "gptq"

    @property
    def own_modules(self) -> bool:
        return self.grid != GPTQ_GRID

    def _problems(self):
        yield from super()._problems()
        if self.grid not in (GPTQ_GRID,) + K_GRIDS:
            yield f"grid must be one of {', '.join((GPTQ_GRID,) + K_GRIDS)}, got {self.grid!r}"
        elif self.grid != GPTQ_GRID:
            fixed = [f"{name} {getattr(self, name)}" for name, default in (("bits", 4), ("group_size", 128))
                     if getattr(self, name) != default]
            fixed += ["act_order"] if self.act_order else []
            if fixed:
                yield (f"grid {self.grid} fixes the grid (Q4_K: 4-bit codes, 6-bit scales and mins per 32 columns "
                       f"under fp16 scales per 256), so {', '.join(fixed)} {'does' if len(fixed) == 1 else 'do'} "
                       "not apply")
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize <= 0:
            yield f"blocksize must be a positive integer, got {self.blocksize!r}"
        if not 0 < self.percdamp < 1:
            yield f"percdamp must be in (0, 1), got {self.percdamp}"


@dataclass(frozen=True)
class AWQConfig(CalibratedConfig):
    """AWQ (Lin et al. 2023). n_grid, max_shrink and clip_tokens are the reference code's
    20, 0.5 and 512; search_scale / search_clip switch off either half (for ablations)."""

    n_grid: int = knob(20, "scale exponents tried per group")
    max_shrink: float = knob(0.5, "largest clipping shrink tried")
    clip_tokens: int = knob(512, "calibration tokens the clipping search looks at")
    search_scale: bool = knob(True, "search per-channel scales (false: ablation)")
    search_clip: bool = knob(True, "search clipping ranges (false: ablation)")

    method = "awq"

    def _problems(self):
        yield from super()._problems()
        for name in ("n_grid", "clip_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                yield f"{name} must be a positive integer, got {value!r}"
        if not 0 <= self.max_shrink < 1:
            yield f"max_shrink must be in [0, 1), got {self.max_shrink}"


BNB_QUANT_METHOD = "bitsandbytes"  # quantization_config's quant_method for int8/nf4, as transformers writes it
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's 4-bit kernels take
BNB_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BnbConfig(QuantConfig):
    """The bitsandbytes methods (quant/bnb.py): no grid and no calibration, only which
    layers they cover. Their layers are bnb's own modules."""

    @property
    def own_modules(self) -> bool:
        return True


@dataclass(frozen=True)
class BnbInt8Config(BnbConfig):
    """LLM.int8() (Dettmers et al. 2022): int8 weight rows; input columns holding an
    |x| >= threshold (the paper's 6.0) multiply in float. 0 turns that decomposition off."""

    threshold: float = knob(6.0, "outlier threshold of LLM.int8() (0 = off)")

    method = "int8"

    def _problems(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            yield f"threshold must be a number >= 0 (0 turns the outlier decomposition off), got {self.threshold!r}"


@dataclass(frozen=True)
class BnbNF4Config(BnbConfig):
    """NF4 (QLoRA, Dettmers et al. 2023): blocks of `blocksize` weights on the NormalFloat grid.

    compute_dtype: what a layer dequantizes to and multiplies in. float32 by default: on a
    CPU that is the model's own dtype, so a layer computes exactly x @ dequant(W)^T; bf16
    only pays off for long prefills, fp16 not at all (no fast CPU fp16 matmul).
    double_quant: QLoRA's 8-bit block absmaxes (0.5 -> 0.127 bits per weight); off, as in
    transformers, so each block's scale stays exact.
    """

    blocksize: int = knob(64, "GPTQ: columns per lazy batch update; NF4: weights per block")
    compute_dtype: str = knob("float32", "the dtype an NF4 layer dequantizes to and multiplies in",
                              choices=BNB_COMPUTE_DTYPES)
    double_quant: bool = knob(False, "store the block absmaxes in 8 bits too (QLoRA's double quantization)")

    method = "nf4"

    def _problems(self):
        if isinstance(self.blocksize, bool) or self.blocksize not in BNB_BLOCKSIZES:
            yield f"blocksize must be one of {', '.join(map(str, BNB_BLOCKSIZES))}, got {self.blocksize!r}"
        if self.compute_dtype not in BNB_COMPUTE_DTYPES:
            yield f"compute_dtype must be one of {', '.join(BNB_COMPUTE_DTYPES)}, got {self.compute_dtype!r}"




def describe(qconfig: dict) -> str:
    """What a quantized checkpoint holds ("gptq 4-bit", "bitsandbytes nf4", "gptq q4_k_m"), for messages."""
    if qconfig.get("checkpoint_format") == GGML_CHECKPOINT_FORMAT:
        return f"{qconfig.get('quant_method')} {qconfig.get('grid')}"
    if qconfig.get("quant_method") == BNB_QUANT_METHOD:
        return f"{BNB_QUANT_METHOD} {'int8' if qconfig.get('load_in_8bit') else qconfig.get('bnb_4bit_quant_type')}"
    return f"{qconfig.get('quant_method')} {qconfig.get('bits')}-bit"
