"""One small validated config per quantization method (torchao style): the config's type
picks the handler in `quant.quantize`, and the checkpoint stores it as
`quantization_config` in config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fanformer.errors import FANformerError
from quant.packing import BITS

GROUP_SIZES = (128, 64, 32, -1)  # -1: one group per output channel


@dataclass(frozen=True)
class QuantConfig:
    """What every method's config shares: which layers it covers, validation, to_dict.

    keep: fnmatch patterns of module names left in float (e.g. "blocks.*.attn.fan.proj"); a
        pattern naming a module keeps every linear inside it (both factors of a CoLA layer).
    lm_head: quantize the LM head too (never when it is tied to the embedding).
    """

    keep: tuple[str, ...] = ()
    lm_head: bool = False

    method = ""  # quant_method in the checkpoint

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

    bits: int = 4
    group_size: int = 128
    sym: bool = True

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

    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    batch_size: int = 8  # calibration sequences per forward pass (memory, not results)

    def _problems(self):
        yield from super()._problems()
        for name in ("calib_samples", "calib_seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                yield f"{name} must be a positive integer, got {value!r}"


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ (Frantar et al. 2022). percdamp and blocksize are the paper's 1% and 128."""

    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128

    method = "gptq"

    def _problems(self):
        yield from super()._problems()
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize <= 0:
            yield f"blocksize must be a positive integer, got {self.blocksize!r}"
        if not 0 < self.percdamp < 1:
            yield f"percdamp must be in (0, 1), got {self.percdamp}"


@dataclass(frozen=True)
class AWQConfig(CalibratedConfig):
    """AWQ (Lin et al. 2023). n_grid, max_shrink and clip_tokens are the reference code's
    20, 0.5 and 512; search_scale / search_clip switch off either half (for ablations)."""

    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_scale: bool = True
    search_clip: bool = True

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
    layers they cover."""


@dataclass(frozen=True)
class BnbInt8Config(BnbConfig):
    """LLM.int8() (Dettmers et al. 2022): int8 weight rows; input columns holding an
    |x| >= threshold (the paper's 6.0) multiply in float. 0 turns that decomposition off."""

    threshold: float = 6.0

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

    blocksize: int = 64
    compute_dtype: str = "float32"
    double_quant: bool = False

    method = "nf4"

    def _problems(self):
        if isinstance(self.blocksize, bool) or self.blocksize not in BNB_BLOCKSIZES:
            yield f"blocksize must be one of {', '.join(map(str, BNB_BLOCKSIZES))}, got {self.blocksize!r}"
        if self.compute_dtype not in BNB_COMPUTE_DTYPES:
            yield f"compute_dtype must be one of {', '.join(BNB_COMPUTE_DTYPES)}, got {self.compute_dtype!r}"


CONFIGS = {cls.method: cls for cls in (RTNConfig, GPTQConfig, AWQConfig, BnbInt8Config, BnbNF4Config)}
