"""The FANformer decoder (Dong et al. 2025, arXiv 2502.21309), read top to bottom:
helpers -> norm -> CoLA linear -> FAN layer -> ATF attention -> SwiGLU -> block -> model.

Options from docs/architecture.md: HybridNorm (Zhuo et al. 2025, arXiv 2503.04598),
CoLA low-rank layers (Liu et al. 2025, arXiv 2502.10940), gated residuals, GQA, RoPE;
config.mixer = "fftnet" swaps attention for a causal FFTNet mixer (fanformer/fftnet.py),
config.head = "fourier" the linear LM head for a Fourier Head (fanformer/fourier_head.py).
Shapes: B batch, T new tokens, S cached + new tokens, nh query heads, nkv key/value
heads, hs head size, C d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fanformer.config import FANformerConfig
from fanformer.fftnet import CausalSpectralFilter
from fanformer.fourier_head import FourierHead


# --- Pure helpers -------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for integer positions (B, T) -> cos, sin (B, 1, T, hs), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hs): rotate-half layout, as Hugging Face Llama
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hs) by position; the two halves of hs are the (real, imag) parts."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def fan_features(h: torch.Tensor, d_periodic: int, activation: str) -> torch.Tensor:
    """FANLayer' output [cos(P) || sin(P) || act(G)] from the fused projection h = [P || G]."""
    p, g = h[..., :d_periodic], h[..., d_periodic:]
    if activation == "gelu":
        g = F.gelu(g)
    return torch.cat([torch.cos(p), torch.sin(p), g], dim=-1)


def attention_bias(attention_mask: torch.Tensor | None, past_len: int, q_len: int, batch: int,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): causal over past + new tokens, minus padded keys.

    A query that would see no key at all (a left-pad position) is allowed to see
    itself, so softmax stays finite; its output is never used.
    """
    total = past_len + q_len
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, total)  # (B, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool()
    return mask | (k_pos == q_pos)[None, None]


def head_loss_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of head(h) (N, C) against targets (N,), in fp32, and
    the summed per-position auxiliary loss (the Fourier head's smoothness penalty, else 0)."""
    if isinstance(head, FourierHead):
        log_probs, penalty = head(h, return_penalty=True)  # penalty: the mean over the N positions
        return F.cross_entropy(log_probs.float(), targets, reduction="sum"), penalty * len(targets)
    return F.cross_entropy(head(h).float(), targets, reduction="sum"), torch.zeros((), device=h.device)


def chunked_head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and auxiliary loss of head(h) for h (B, T, C), `chunk` positions at a time.

    Each chunk's (chunk, vocab) logits are recomputed in backward (torch.utils.checkpoint)
    instead of kept, so at most one chunk of logits and its gradient exist at once: with
    paper-1b's 50k vocabulary, 2048 positions of fp32 logits are 412 MB, and the plain path
    keeps them, their softmax and their gradient. The result is the plain path's up to the
    order of the float additions.
    """
    h, targets = h.flatten(0, 1), targets.flatten()  # (N, C), (N,)
    ce, aux = h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        ce_part, aux_part = checkpoint(head_loss_sum, head, h[start:start + chunk], targets[start:start + chunk],
                                       use_reentrant=False)
        ce, aux = ce + ce_part, aux + aux_part
    return ce / len(targets), aux / len(targets)


# --- KV cache -----------------------------------------------------------------

class KVCache:
    """Keys and values per layer, (B, nkv, S, hs), in buffers that grow by doubling, so a
    decode step writes one position instead of copying the whole cache.

    `update` has the signature of transformers' Cache.update, so the model runs
    unchanged under `model.generate` with a transformers DynamicCache.
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.reset()

    def reset(self) -> None:
        self.keys: list[torch.Tensor | None] = [None] * self.n_layers
        self.values: list[torch.Tensor | None] = [None] * self.n_layers
        self.lengths = [0] * self.n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + key.shape[2]
        if self.keys[layer_idx] is None or end > self.keys[layer_idx].shape[2]:
            self.keys[layer_idx] = _grown(self.keys[layer_idx], key, start, end)
            self.values[layer_idx] = _grown(self.values[layer_idx], value, start, end)
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    @classmethod
    def join(cls, parts: list[tuple["KVCache", list[int]]], length: int) -> "KVCache":
        """A cache of `length` positions holding the listed rows of each part, in order.

        Sequences are left-padded, so each part's last positions (up to `length` of them)
        are kept, right-aligned to end at `length`; what comes before is zeros, which the
        caller masks as padding. A server's batch takes new sequences in and lets finished
        ones go between decode steps this way (runtime/scheduler.py)."""
        joined = cls(parts[0][0].n_layers)
        for layer in range(joined.n_layers):
            for buffers, joined_buffers in ((lambda c: c.keys, joined.keys), (lambda c: c.values, joined.values)):
                chunks = []
                for cache, rows in parts:
                    held, take = cache.lengths[layer], min(cache.lengths[layer], length)
                    source = buffers(cache)[layer]  # (B, nkv, capacity, hs)
                    chunk = source.new_zeros(len(rows), source.shape[1], max(2 * length, 64), source.shape[3])
                    chunk[:, :, length - take:length] = source[rows, :, held - take:held]
                    chunks.append(chunk)
                joined_buffers[layer] = torch.cat(chunks)
            joined.lengths[layer] = length
        return joined


def _grown(buffer: torch.Tensor | None, like: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    """A buffer of at least twice the needed length holding the first `used` positions."""
    B, H, _, D = like.shape
    new = like.new_empty(B, H, max(2 * needed, 64), D)
    if buffer is not None:
        new[:, :, :used] = buffer[:, :, :used]
    return new


# --- Layers -------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 under bf16/fp16
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class CoLALinear(nn.Module):
    """CoLA low-rank layer: W x  ->  B silu(A x), rank r << min(in, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(F.silu(self.lora_a(x)))


def make_linear(config: FANformerConfig, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    rank = config.cola_rank_for(in_features)
    if rank:
        return CoLALinear(in_features, out_features, rank, bias)
    return nn.Linear(in_features, out_features, bias=bias)


class FANLayer(nn.Module):
    """FANLayer': d -> [cos(P) || sin(P) || G], one fused projection with bias."""

    def __init__(self, config: FANformerConfig):
        super().__init__()
        self.d_periodic = config.d_periodic
        self.activation = config.fan_activation
        self.proj = make_linear(config, config.d_model, config.d_periodic + config.d_plain, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fan_features(self.proj(x), self.d_periodic, self.activation)  # (B, T, C)


class Attention(nn.Module):
    """ATF attention: Attention(FANLayer'(X)) with GQA, RoPE and optional QKV-norm."""

    def __init__(self, config: FANformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.dropout = config.dropout
        d = config.d_model
        self.fan = FANLayer(config) if config.has_fan else None
        self.q_proj = make_linear(config, d, self.n_heads * self.head_dim)
        self.k_proj = make_linear(config, d, self.n_kv_heads * self.head_dim)
        self.v_proj = make_linear(config, d, self.n_kv_heads * self.head_dim)
        self.o_proj = make_linear(config, self.n_heads * self.head_dim, d)
        # HybridNorm: blocks after the first normalise Q, K and V per head instead of the input.
        self.qkv_norm = config.norm == "hybrid" and layer_idx > 0
        if self.qkv_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.v_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fan is not None:
            x = self.fan(x)  # (B, T, C)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hs)
        # No mask: causal over the new tokens, or a single new token that sees the whole cache.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class FFTNetMixer(nn.Module):
    """FFTNet(FANLayer'(X)) in attention's place: value projection, the causal adaptive
    spectral filter with modReLU (fanformer/fftnet.py), output projection.

    Its cache is the value history, which the filter convolves whole at every step. The
    value width is that of attention's keys and values together, 2 nkv hs, so the history
    goes into the KV-cache slots as they are (channels split over K and V): the KVCache,
    transformers' caches and the ONNX export's past/present tensors all carry it unchanged.
    """

    def __init__(self, config: FANformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_kv_heads, self.head_dim = config.n_kv_heads, config.head_dim
        width = 2 * config.n_kv_heads * config.head_dim
        self.fan = FANLayer(config) if config.has_fan else None
        self.v_proj = make_linear(config, config.d_model, width)
        # HybridNorm normalises V in the blocks whose input it does not normalise.
        self.v_norm = RMSNorm(width, config.norm_eps) if config.norm == "hybrid" and layer_idx > 0 else None
        self.filter = CausalSpectralFilter(width, config.max_seq_len)
        self.o_proj = make_linear(config, width, config.d_model)

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """Attention's call, but mask is the (B, S) real-token mask over cached + new tokens
        (or None), and cos, sin go unused: positions are the filter's lags."""
        B, T, _ = x.shape
        if self.fan is not None:
            x = self.fan(x)  # (B, T, C)
        v = self.v_proj(x)  # (B, T, W)
        if self.v_norm is not None:
            v = self.v_norm(v)
        if mask is not None:
            v = v * mask[:, -T:, None].to(v.dtype)  # padding adds nothing, now or later from the cache
        if cache is not None:
            halves = v.view(B, T, 2, self.n_kv_heads, self.head_dim).transpose(1, 3)  # (B, nkv, 2, T, hs)
            k, v = cache.update(halves[:, :, 0], halves[:, :, 1], self.layer_idx)  # (B, nkv, S, hs) each
            v = torch.stack([k, v], dim=2).transpose(1, 3).flatten(2)  # (B, S, W)
        return self.o_proj(self.filter(v, mask, new=T))  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, config: FANformerConfig):
        super().__init__()
        self.gate_proj = make_linear(config, config.d_model, config.ffn_dim)
        self.up_proj = make_linear(config, config.d_model, config.ffn_dim)
        self.down_proj = make_linear(config, config.ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder block.

    pre:    x = x + r(attn(norm(x)));   x = x + r(ffn(norm(x)))
    hybrid: x = x + r(attn(x))  (QKV-norm inside; block 0 pre-norms instead)
            z = norm(x);  x = z + r(ffn(z))  (FFN post-norm, residual taken after the norm)
    where r(y) = sigmoid(g) * dropout(y) with gated residuals, dropout(y) otherwise.
    """

    def __init__(self, config: FANformerConfig, layer_idx: int):
        super().__init__()
        self.post_norm_ffn = config.norm == "hybrid"
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps) if (config.norm == "pre" or layer_idx == 0) else None
        # The token mixer; named attn for either kind, so attention checkpoints keep their keys.
        self.attn = FFTNetMixer(config, layer_idx) if config.mixer == "fftnet" else Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)
        if config.gated_residual:
            self.attn_gate = nn.Parameter(torch.zeros(config.d_model))
            self.ffn_gate = nn.Parameter(torch.zeros(config.d_model))
        else:
            self.attn_gate = self.ffn_gate = None

    def residual(self, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        y = self.dropout(y)
        return y if gate is None else torch.sigmoid(gate).to(y.dtype) * y

    def forward(self, x, cos, sin, mask, cache=None):
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.residual(self.attn(h, cos, sin, mask, cache), self.attn_gate)
        if self.post_norm_ffn:
            z = self.ffn_norm(x)
            return z + self.residual(self.ffn(z), self.ffn_gate)
        return x + self.residual(self.ffn(self.ffn_norm(x)), self.ffn_gate)


# --- Model --------------------------------------------------------------------

class FANformer(nn.Module):
    def __init__(self, config: FANformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if config.head == "fourier":
            self.lm_head = FourierHead(config.d_model, config.vocab_size, config.fourier_frequencies)
        elif config.cola_lm_head:
            self.lm_head = CoLALinear(config.d_model, config.vocab_size,
                                      config.cola_rank_for(config.d_model), bias=False)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Training-memory switches (set by fanformer/training.py; neither changes the result):
        self.checkpoint_blocks = False  # recompute each block's activations in backward
        self.loss_chunk = 0  # with targets: positions per cross-entropy chunk; 0 = all at once
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official code's "mitchell" init: truncated normal (3 sigma), std 1/sqrt(fan_in),
        output projections scaled down by depth; CoLA factors share the layer's std."""
        d, ffn = self.config.d_model, self.config.ffn_dim
        _trunc_normal(self.embed.weight, 1 / math.sqrt(d))
        for i, block in enumerate(self.blocks):
            for name, module in block.named_modules():
                if name.endswith("o_proj"):
                    _init_linear(module, 1 / math.sqrt(2 * d * (i + 1)))
                elif name.endswith("down_proj"):
                    _init_linear(module, 1 / math.sqrt(2 * ffn * (i + 1)))
                elif isinstance(module, (nn.Linear, CoLALinear)) and not name.endswith(("lora_a", "lora_b")):
                    _init_linear(module, 1 / math.sqrt(module.in_features))
        for module in self.modules():
            if isinstance(module, CausalSpectralFilter):
                module.reset_parameters()
        if isinstance(self.lm_head, FourierHead):
            self.lm_head.reset_parameters()
        elif not self.config.tie_embeddings:
            _init_linear(self.lm_head, 1 / math.sqrt(d))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, return_aux: bool = False,
                targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) for input_ids (B, T).

        attention_mask (B, S) marks real tokens (1) against padding (0) over the cached
        and new tokens; position_ids (B, T) default to the count of real tokens before
        each one. With no cache, no mask and no padding this is the plain causal
        reference path. With return_aux, (logits, aux) where aux is the auxiliary
        training loss: the Fourier head's weighted smoothness penalty, else 0.
        With targets (B, T), (loss, aux) instead: the mean next-token cross-entropy in fp32,
        computed `self.loss_chunk` positions at a time when that is set (the logits are then
        never whole), and aux as above. The loss is computed here rather than by the caller
        so that DDP's and FSDP's hooks see the LM head's use.
        """
        if self.config.mixer == "fftnet":
            cos = sin = None  # no positions: the filters' lags are them
            mask = attention_mask  # (B, S) real tokens, or None
        else:
            cos, sin, mask = self._attention_inputs(input_ids, attention_mask, position_ids, cache)
        x = self.embed(input_ids)  # (B, T, C)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # Keep only the block's input; rerun the block in backward. The RNG state is
                # stashed and restored, so dropout draws the same masks both times.
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        h = self.norm(x)  # (B, T, C)
        fourier = isinstance(self.lm_head, FourierHead)
        if targets is not None and self.loss_chunk:
            loss, penalty = chunked_head_loss(self.lm_head, h, targets, self.loss_chunk)
            return loss, self.config.fourier_reg * penalty if fourier else penalty
        if fourier and (return_aux or targets is not None):
            logits, penalty = self.lm_head(h, return_penalty=True)
            aux = self.config.fourier_reg * penalty
        else:
            logits, aux = self.lm_head(h), torch.zeros((), device=h.device)  # (B, T, vocab)
        if targets is not None:
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), aux
        return (logits, aux) if return_aux else logits

    def _attention_inputs(self, input_ids, attention_mask, position_ids, cache):
        """RoPE tables (B, 1, T, hs) and the attention mask (B, 1, T, S) or None."""
        B, T = input_ids.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, 1, T, hs)
        mask = None  # the plain causal case, and one unpadded decode step, need none
        if attention_mask is not None or (past_len > 0 and T > 1):
            mask = attention_bias(attention_mask, past_len, T, B, input_ids.device)  # (B, 1, T, S)
        return cos, sin, mask

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layers)


def _trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


def _init_linear(module: nn.Module, std: float) -> None:
    if isinstance(module, CoLALinear):
        # A keeps unit-variance activations; B takes the layer's std, rescaled for the rank.
        _trunc_normal(module.lora_a.weight, 1 / math.sqrt(module.in_features))
        _trunc_normal(module.lora_b.weight, std * math.sqrt(module.in_features / module.rank))
        if module.lora_b.bias is not None:
            module.lora_b.bias.zero_()
        return
    _trunc_normal(module.weight, std)
    if module.bias is not None:
        module.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Exact count of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
