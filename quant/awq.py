"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv 2306.00978), following the
paper and its reference code (mit-han-lab/llm-awq `auto_scale.py`, `auto_clip.py`).

The published packages (llm-awq, AutoAWQ) hard-code Hugging Face LLaMA/OPT/... module
layouts and need CUDA kernels; FANformer's block is none of those, so the search is the
project's own. It ends on the shared grid (`quant.grid`) and in the GPTQ checkpoint layout.

Per block, on the calibration inputs (the float model's, block after block):

1. Scale search. For a group of linears that read the same input X, with the op that
   produces X able to absorb a per-channel factor exactly ("fold"):
       s = mean|X|^alpha, normalised by sqrt(max(s) min(s)),  alpha in {0, 1/n_grid, ...}
       W' = Q(W diag(s)) diag(s)^-1,  loss(alpha) = || f(X; W') - f(X; W) ||^2
   where f is the smallest module holding the group (attention, FFN, a linear). The best
   s is then folded: the producer's output channel c is divided by s_c, the readers'
   input columns multiplied by s_c, which leaves the float model unchanged.
2. Clipping search (after scaling), per linear, except q and k (the reference skips them:
   the Q K^T product makes their error hard to measure at the layer): per output row and
   group the range is shrunk to max|w| (1 - i / n_grid), i < max_shrink n_grid, keeping the
   shrink with the least error of the group's partial dot products on `clip_tokens` tokens.
3. Round to nearest on the grid of the scaled, clipped weights.

Where a scale can be folded in FANformer (and why not elsewhere):
- attention input: into the RMSNorm before it (pre-norm blocks, and block 0 of HybridNorm).
  Later HybridNorm blocks read the raw residual stream: no producer to fold into, no scale.
- the FAN output F = [cos(P) || sin(P) || G] that Q, K, V read: G's channels fold into the
  rows of the FAN projection that make G (exact when the plain branch is the identity,
  FANLayer'; with `fan_activation = gelu` it is not, and there is no scale). cos and sin are
  not homogeneous, so a factor cannot pass through them: the periodic channels keep s = 1.
  They are also the channels AWQ would not pick: |cos|, |sin| <= 1 by construction, while
  salient channels are the ones with large activations.
- V -> O: into V's rows. With grouped-query attention each V channel feeds n_heads /
  n_kv_heads O columns, which share its scale (the reference code skips GQA; this is exact
  too). Not with HybridNorm's V norm, which would normalise the factor away.
- FFN input: into the FFN RMSNorm (pre-norm). HybridNorm's FFN post-norm output is also the
  residual, so scaling it would change the residual: no scale.
- up -> down: into the up projection's rows (down reads silu(gate) * up, linear in up).
- CoLA layers B silu(A x): A is a reader like any linear; B reads silu(A x), which a factor
  cannot pass through, so B gets clipping only. The scale of a CoLA producer folds into its B.
- LM head (when quantized): into the final RMSNorm.
Layers left in float with --keep still take part: their columns are scaled so the fold is
exact, they are just not rounded.

Measured (README, "Quantizing"; `benchmarks/quant_drift.py`): its input scales leave the FAN
projection sensitive; keeping it float (`keep=("blocks.*.attn.fan.proj",)`) cut AWQ's KL by a
quarter on the quickstart model for 6.6% more bytes (v_proj is more sensitive still, per
byte). The drift table's `awq-w4g128-keep-fan` row sets it beside plain AWQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from fanformer.model import Attention, CoLALinear, RMSNorm
from fanformer.errors import FANformerError
from fanformer.quant import register, stages
from fanformer.quant.config import AWQConfig
from fanformer.quant.grid import QuantizedWeight, choose_qparams, dequantize, quantize
from fanformer.quant.rtn import rtn_quantize
from fanformer.quant.sequential import Stages


def pseudo_quantize(w: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Quantize-dequantize w (out, in) on the grid the checkpoint will use."""
    scales, zeros = choose_qparams(w, config.bits, config.group_size, config.sym)
    return dequantize(quantize(w, scales, zeros, config.bits, config.group_size), scales, zeros, config.group_size)


# --- Where scales fold ---------------------------------------------------------

def reader(slot: nn.Module) -> nn.Linear:
    """The linear that reads a layer slot's input (A of a CoLA layer)."""
    return slot.lora_a if isinstance(slot, CoLALinear) else slot


def writer(slot: nn.Module) -> nn.Linear:
    """The linear that writes a layer slot's output (B of a CoLA layer)."""
    return slot.lora_b if isinstance(slot, CoLALinear) else slot


def fold_into_norm(norm: RMSNorm) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        norm.weight.data.div_(s)

    return fold


def fold_into_rows(linear: nn.Linear, start: int = 0) -> Callable[[torch.Tensor], None]:
    """Divide output rows start .. start + len(s) (and their bias) by s."""

    def fold(s: torch.Tensor) -> None:
        rows = slice(start, start + len(s))
        linear.weight.data[rows] /= s[:, None]
        if linear.bias is not None:
            linear.bias.data[rows] /= s

    return fold


@dataclass
class ScaleGroup:
    """Linears reading one input X (in,), the fold that absorbs s into X's producer, and
    `index` (in,): the free scale each input channel takes (-1: fixed at 1)."""

    name: str
    readers: list[nn.Linear]
    fold: Callable[[torch.Tensor], None]
    index: torch.Tensor
    inspect: str  # the module whose output the search compares: "attn", "ffn", or a slot name
    n_free: int


def _identity_group(name, readers, fold, inspect) -> ScaleGroup:
    width = readers[0].in_features
    return ScaleGroup(name, readers, fold, torch.arange(width), inspect, width)


def block_groups(model: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The foldable groups of one stage, in the order the module runs them."""
    if prefix == "lm_head":
        if not isinstance(model.lm_head, (nn.Linear, CoLALinear)):  # e.g. the Fourier head: clipping only
            return []
        return [_identity_group("lm_head", [reader(model.lm_head)], fold_into_norm(model.norm), "lm_head")]
    block = model.blocks[int(prefix.split(".")[1])]
    attn, ffn, cfg = block.attn, block.ffn, model.config
    groups = []
    if isinstance(attn, Attention):
        groups += _attention_groups(block, attn, cfg, prefix)
    if not block.post_norm_ffn:
        groups.append(_identity_group(f"{prefix}ffn_norm", [reader(ffn.gate_proj), reader(ffn.up_proj)],
                                      fold_into_norm(block.ffn_norm), "ffn"))
    groups.append(_identity_group(f"{prefix}ffn.up_proj", [reader(ffn.down_proj)], fold_into_rows(writer(ffn.up_proj)),
                                  "ffn.down_proj"))
    return groups


def _attention_groups(block, attn, cfg, prefix: str) -> list[ScaleGroup]:
    """ATF attention's fold points (another mixer, e.g. FFTNet, gets clipping only)."""
    groups = []
    qkv = [reader(attn.q_proj), reader(attn.k_proj), reader(attn.v_proj)]
    first = [reader(attn.fan.proj)] if attn.fan is not None else qkv
    if block.attn_norm is not None:
        groups.append(_identity_group(f"{prefix}attn_norm", first, fold_into_norm(block.attn_norm), "attn"))
    if attn.fan is not None and cfg.fan_activation == "identity":
        d_p, d_plain = cfg.d_periodic, cfg.d_plain
        index = torch.cat([torch.full((2 * d_p,), -1), torch.arange(d_plain)])  # cos(P), sin(P) fixed
        groups.append(ScaleGroup(f"{prefix}attn.fan.proj[G]", qkv, fold_into_rows(writer(attn.fan.proj), d_p),
                                 index, "attn", d_plain))
    if not attn.qkv_norm:
        hs, per_kv = attn.head_dim, attn.n_heads // attn.n_kv_heads
        column = torch.arange(attn.n_heads * hs)
        index = (column // hs // per_kv) * hs + column % hs  # O column -> the V channel it reads
        groups.append(ScaleGroup(f"{prefix}attn.v_proj", [reader(attn.o_proj)], fold_into_rows(writer(attn.v_proj)),
                                 index, "attn.o_proj", attn.n_kv_heads * hs))
    return groups


def reader_scales(group: ScaleGroup, free: torch.Tensor) -> torch.Tensor:
    """Per input channel of the readers: the free scale, or 1 where fixed."""
    padded = torch.cat([free, free.new_ones(1)])
    return padded[group.index]  # index -1 picks the trailing 1


def apply_scales(group: ScaleGroup, free: torch.Tensor) -> None:
    """Fold s into the producer and multiply the readers' columns: the float model is unchanged."""
    group.fold(free)
    s = reader_scales(group, free)
    for linear in group.readers:
        linear.weight.data.mul_(s)


# --- Observing the calibration inputs -----------------------------------------

class Observer:
    """Forward pre-hooks on one stage: per-channel mean |x| and a strided token sample for
    every linear, and the full inputs of the modules a scale search runs."""

    def __init__(self, stage: nn.Module, inspect: dict[str, nn.Module], total_tokens: int, sample_tokens: int):
        self.stride = max(1, total_tokens // sample_tokens)
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {key: [] for key in inspect}
        self.hooks = [m.register_forward_pre_hook(self._observe(name))
                      for name, m in stage.named_modules() if isinstance(m, nn.Linear)]
        self.hooks += [m.register_forward_pre_hook(self._keep(key)) for key, m in inspect.items()]
        self.linear_names = {m: name for name, m in stage.named_modules() if isinstance(m, nn.Linear)}

    def _observe(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            seen = self.count.get(name, 0)
            first = (-seen) % self.stride  # keep global token indices that are multiples of the stride
            self.abs_sum[name] = self.abs_sum.get(name, 0) + x.abs().sum(0)
            self.count[name] = seen + len(x)
            self.samples.setdefault(name, []).append(x[first::self.stride])

        return hook

    def _keep(self, key: str):
        def hook(module, args):
            self.inputs[key].append(args[0].detach())

        return hook

    def mean_abs(self, linear: nn.Linear) -> torch.Tensor:
        name = self.linear_names[linear]
        return self.abs_sum[name] / self.count[name]

    def sample(self, linear: nn.Linear) -> torch.Tensor:
        return torch.cat(self.samples[self.linear_names[linear]])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


# --- The two searches ------------------------------------------------------------

def search_scale(group: ScaleGroup, x_mean: torch.Tensor, run: Callable[[], list[torch.Tensor]],
                 quantized: set[nn.Linear], config: AWQConfig) -> tuple[torch.Tensor, dict]:
    """Grid search over alpha; returns the free scales and the search's record."""
    free_stat = torch.zeros(group.n_free).index_add_(0, group.index.clamp(min=0), x_mean * (group.index >= 0))
    free_stat /= torch.zeros(group.n_free).index_add_(0, group.index.clamp(min=0), (group.index >= 0).float())
    originals = [linear.weight.data.clone() for linear in group.readers]
    reference = run()
    losses = []
    best, best_loss = torch.ones(group.n_free), math.inf
    for step in range(config.n_grid):
        alpha = step / config.n_grid
        free = free_stat.pow(alpha).clamp(min=1e-4)
        free = free / (free.max() * free.min()).sqrt()
        s = reader_scales(group, free)
        for linear, weight in zip(group.readers, originals):
            scaled = weight * s
            linear.weight.data = (pseudo_quantize(scaled, config) if linear in quantized else scaled) / s
        loss = sum(float((out - ref).float().pow(2).mean()) for out, ref in zip(run(), reference)) / len(reference)
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = free, loss
    for linear, weight in zip(group.readers, originals):
        linear.weight.data = weight
    return best, {"alpha": losses.index(best_loss) / config.n_grid, "loss": best_loss, "loss_alpha0": losses[0]}


def partial_outputs(x: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """Each group's share of x w^T: x (n, in), w (out, in) -> (out, n, groups)."""
    n, in_features = x.shape
    return torch.einsum("ngk,ogk->ong", x.reshape(n, -1, size), w.reshape(len(w), -1, size))


def group_output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, group_size: int) -> float:
    """Mean squared error of the groups' partial outputs, the clipping search's measure."""
    size = w.shape[1] if group_size == -1 else group_size
    return float(partial_outputs(x, w - q, size).pow(2).mean())


def search_clip(w: torch.Tensor, x: torch.Tensor, config: AWQConfig, rows_per_batch: int = 64) -> tuple[torch.Tensor, float]:
    """Best clipped weight for w (out, in) on input tokens x (n, in), and its error (the
    mean squared error of the groups' partial outputs)."""
    out_features, in_features = w.shape
    size = in_features if config.group_size == -1 else config.group_size
    clipped, errors = torch.empty_like(w), []
    for r in range(0, out_features, rows_per_batch):
        wb = w[r:r + rows_per_batch].reshape(-1, in_features // size, size)  # (ob, groups, size)
        reference = partial_outputs(x, wb, size)  # (ob, n, groups)
        max_val = wb.abs().amax(-1, keepdim=True)  # (ob, groups, 1)
        best_max, best_err = max_val.clone(), torch.full(max_val.shape, math.inf)
        for step in range(max(1, int(config.max_shrink * config.n_grid))):
            limit = max_val * (1 - step / config.n_grid)
            q = pseudo_quantize(torch.clamp(wb, -limit, limit).reshape(len(wb), in_features), config)
            err = (partial_outputs(x, q, size) - reference).pow(2).mean(1)[..., None]  # (ob, groups, 1)
            better = err < best_err
            best_err, best_max = torch.where(better, err, best_err), torch.where(better, limit, best_max)
        clipped[r:r + len(wb)] = torch.clamp(wb, -best_max, best_max).reshape(len(wb), in_features)
        errors.append(best_err.flatten())
    return clipped, float(torch.cat(errors).mean())


def _no_clip(name: str) -> bool:
    return ".q_proj" in name or ".k_proj" in name


# --- The whole model --------------------------------------------------------------

def awq_sequential(model: nn.Module, layers: dict[str, nn.Linear], config: AWQConfig, calibration: torch.Tensor,
                   stages: list[tuple[str, list[str]]], progress: bool) -> tuple[dict[str, QuantizedWeight], dict]:
    """Scale and clip searches block by block on the float model's activations, then RTN.
    Returns the per-layer results and the scale search record for the report."""
    run = Stages(model, calibration, config.batch_size)
    quantized = set(layers.values())
    total_tokens = calibration.numel()
    results, record = {}, {}
    bar = tqdm(total=len(stages), desc="awq", unit="block", disable=not progress)
    for prefix, stage_names in stages:
        bar.set_postfix_str(prefix.rstrip("."))
        stage = model.lm_head if prefix == "lm_head" else model.get_submodule(prefix.rstrip("."))
        groups = block_groups(model, prefix) if config.search_scale else []
        modules = {g.inspect: (stage if prefix == "lm_head" else stage.get_submodule(g.inspect)) for g in groups}
        observer = Observer(stage, modules, total_tokens, config.clip_tokens)
        try:
            for x in run.inputs:
                run.run(prefix, x)
        finally:
            observer.remove()
        searched = []
        for group in groups:
            module, inputs = modules[group.inspect], observer.inputs[group.inspect]
            runner = _runner(module, inputs, run)
            free, info = search_scale(group, observer.mean_abs(group.readers[0]), runner, quantized, config)
            record[group.name] = info
            searched.append((group, free))
        del observer.inputs
        for group, free in searched:  # all searched on the unscaled model, as the reference does
            apply_scales(group, free)
            s = reader_scales(group, free)
            for linear in group.readers:  # the readers now see x / s
                observer.samples[observer.linear_names[linear]] = [observer.sample(linear) / s]
        for name in stage_names:
            linear = layers[name]
            error = math.nan
            if config.search_clip and not _no_clip(name):
                clipped, error = search_clip(linear.weight.data.float(), observer.sample(linear), config)
                linear.weight.data.copy_(clipped)
            result = rtn_quantize(linear.weight.data, config.bits, config.group_size, config.sym)
            if math.isnan(error):  # no clipping search: the same measure, unclipped
                error = group_output_error(linear.weight.data.float(), result.dequantize(), observer.sample(linear),
                                           config.group_size)
            result.error, result.metric = error, "awq_output_mse"
            results[name] = result
        run.advance(prefix)  # the float (scaled, clipped) block's outputs feed the next, as in the reference
        bar.update()
    bar.close()
    return results, {"awq_scales": record}


def _runner(module: nn.Module, inputs: list[torch.Tensor], run: Stages) -> Callable[[], list[torch.Tensor]]:
    """The inspected module on its recorded inputs (attention needs the RoPE tables)."""
    if isinstance(module, Attention):
        return lambda: [module(x, run.cos, run.sin, None) for x in inputs]
    return lambda: [module(x) for x in inputs]


@register(AWQConfig)
def awq_handler(model, layers, config: AWQConfig, calibration, progress):
    """`quantize`'s handler for AWQ."""
    if calibration is None:
        raise FANformerError("AWQ needs calibration data: pass calibration token windows (samples, seq_len)")
    return awq_sequential(model, layers, config, calibration, stages(model, layers), progress)
