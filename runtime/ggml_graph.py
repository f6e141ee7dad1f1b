"""The FANformer forward as one ggml compute graph over a GGUF file's own tensors, for
the ggml engine of the GGUF backend (runtime/ggml_engine.py runs it).

Engine: ggml (https://github.com/ggml-org/ggml, the library llama.cpp runs on), through
ggml-python's ctypes bindings of ggml.h. The graph mirrors fanformer/model.py block by
block (the reference); the tensor names are export/gguf_format.py's.

ggml's dimension order is the reverse of torch's: ne[0] is the fastest-varying one. So
N = B * T tokens of width C are a (C, N) tensor, a weight (out, in) in torch is
(in, out) here, and `mul_mat(W, x)` is torch's `x @ W.T`. Token n is sequence n // T,
position n % T (sequences are contiguous).

The KV cache of each layer is one 2-D tensor per K and V, (nkv * hs, n_ctx * B): row
b * n_ctx + p holds the keys of all KV heads of sequence b at position p. A graph writes
the new rows with `set_rows` (the row indices are an input, so one graph serves every
step with the same shape) and attends over the first `n_kv` positions of each sequence
with `flash_attn_ext`; the mask (an input too) hides positions not yet written and
left padding.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import ggml as G

from fanformer.config import FANformerConfig

GRAPH_NODES = 8192  # ggml's default graph holds 2048 nodes; a 12-layer CoLA model needs ~1,000


@dataclass(frozen=True)
class Shape:
    """What a graph is built for: `batch` sequences of `tokens` new tokens each, attending
    over `n_kv` cache positions; `last_only` computes the logits of the last position only."""

    batch: int
    tokens: int
    n_kv: int
    last_only: bool


@dataclass
class Graph:
    """A built graph and its input / output tensors (ggml_tensor pointers)."""

    context: int  # ggml_context holding the graph's tensor headers
    graph: object
    ids: object  # (N,) int32 token ids
    positions: object  # (N,) int32 RoPE positions
    rows: object  # (N,) int64 cache rows the new keys and values go to
    mask: object  # (n_kv, T, 1, B) f16: 0 where a token may attend, -inf elsewhere
    logits: object  # (vocab, N) or (vocab, B) f32
    shape: Shape


@dataclass(frozen=True)
class Model:
    """What the graph is built from: the config, the file's tensors by GGUF name and the
    RoPE layout (GGML_ROPE_TYPE_NEOX for rotate-half rows, _NORMAL for llama.cpp's
    interleaved ones), and the residual gates' sigmoids."""

    config: FANformerConfig
    weights: dict  # GGUF name -> ggml_tensor pointer
    rope_mode: int
    gates: dict  # residual gate name -> sigmoid(g), computed once at load (f32)


def build(model: Model, cache_k: list, cache_v: list, n_ctx: int, shape: Shape) -> Graph:
    """The forward for `shape` over the cache tensors (one K and one V per layer)."""
    size = GRAPH_NODES * G.ggml_tensor_overhead() + G.ggml_graph_overhead_custom(GRAPH_NODES, False)
    ctx = G.ggml_init(G.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
    B, T = shape.batch, shape.tokens
    N = B * T
    inputs = {name: G.ggml_new_tensor_1d(ctx, kind, N)
              for name, kind in (("ids", G.GGML_TYPE_I32), ("positions", G.GGML_TYPE_I32), ("rows", G.GGML_TYPE_I64))}
    mask = G.ggml_new_tensor_4d(ctx, G.GGML_TYPE_F16, shape.n_kv, T, 1, B)
    for tensor in (*inputs.values(), mask):
        G.ggml_set_input(tensor)
    net = _Net(ctx, model, inputs["positions"], mask, shape, n_ctx)
    gf = G.ggml_new_graph_custom(ctx, GRAPH_NODES, False)
    logits = net.forward(inputs["ids"], inputs["rows"], cache_k, cache_v)
    G.ggml_set_output(logits)
    G.ggml_build_forward_expand(gf, logits)
    return Graph(ctx, gf, inputs["ids"], inputs["positions"], inputs["rows"], mask, logits, shape)


class _Net:
    """The layers of fanformer/model.py as graph-building methods; each takes and returns
    ggml tensors. Holds what every layer needs: the context, the weights, the inputs."""

    def __init__(self, ctx, model: Model, positions, mask, shape: Shape, n_ctx: int):
        self.ctx, self.c, self.w, self.gates = ctx, model.config, model.weights, model.gates
        self.rope_mode, self.positions, self.mask = model.rope_mode, positions, mask
        self.shape, self.n_ctx = shape, n_ctx

    def has(self, name: str) -> bool:
        return name in self.w

    def vector(self, name: str):
        """A 1-D tensor (norm weight, bias, gate) as f32: the export writes them f32; any other float type is cast."""
        t = self.w[name]
        return t if t.contents.type == G.GGML_TYPE_F32 else G.ggml_cast(self.ctx, t, G.GGML_TYPE_F32)

    # --- Layers --------------------------------------------------------------------

    def rms_norm(self, x, weight: str):
        """RMSNorm over ne[0] (per token, or per head on a (hs, h, N) tensor), then the affine weight."""
        return G.ggml_mul(self.ctx, G.ggml_rms_norm(self.ctx, x, self.c.norm_eps), self.vector(weight))

    def linear(self, x, name: str):
        """`name`.weight x + bias, or CoLA's B silu(A x) + bias when the file holds the factors."""
        ctx = self.ctx
        if self.has(f"{name}.weight"):
            y, bias = G.ggml_mul_mat(ctx, self.w[f"{name}.weight"], x), f"{name}.bias"
        else:
            h = G.ggml_silu(ctx, G.ggml_mul_mat(ctx, self.w[f"{name}_a.weight"], x))
            y, bias = G.ggml_mul_mat(ctx, self.w[f"{name}_b.weight"], h), f"{name}_b.bias"
        return G.ggml_add(ctx, y, self.vector(bias)) if self.has(bias) else y

    def fan(self, x, i: int):
        """FANLayer': [cos(P) || sin(P) || act(G)] from the fused projection [P || G] (C, N)."""
        ctx, dp = self.ctx, self.c.d_periodic
        h = self.linear(x, f"blk.{i}.fan")  # (dp + dg, N)
        n, row = h.contents.ne[1], h.contents.nb[1]
        p = G.ggml_view_2d(ctx, h, dp, n, row, 0)  # (dp, N); cos and sin take strided rows
        g = G.ggml_view_2d(ctx, h, self.c.d_plain, n, row, dp * h.contents.nb[0])  # (dg, N)
        g = G.ggml_gelu_erf(ctx, G.ggml_cont(ctx, g)) if self.c.fan_activation == "gelu" else g
        periodic = G.ggml_concat(ctx, G.ggml_cos(ctx, p), G.ggml_sin(ctx, p), 0)  # (2 dp, N)
        return G.ggml_concat(ctx, periodic, g, 0)  # (C, N)

    def rope(self, x):
        """RoPE on (hs, h, N) at the input positions; theta as the config's."""
        hs = self.c.head_dim
        return G.ggml_rope_ext(self.ctx, x, self.positions, None, hs, self.rope_mode, 0, self.c.rope_theta,
                               1.0, 0.0, 1.0, 0.0, 0.0)

    def cached(self, cache, new, rows):
        """Write `new` (nkv hs, N) into the cache rows; a (hs, n_kv, nkv, B) view of the
        first n_kv positions of each sequence, computed after the write."""
        c, (B, n_kv) = self.c, (self.shape.batch, self.shape.n_kv)
        written = G.ggml_set_rows(self.ctx, cache, new, rows)
        row = written.contents.nb[1]
        return G.ggml_view_4d(self.ctx, written, c.head_dim, n_kv, c.n_kv_heads, B,
                              row, c.head_dim * written.contents.nb[0], self.n_ctx * row, 0)

    def attention(self, x, i: int, cache_k, cache_v, rows):
        ctx, c = self.ctx, self.c
        B, T, N, hs = self.shape.batch, self.shape.tokens, self.shape.batch * self.shape.tokens, c.head_dim
        if c.has_fan:
            x = self.fan(x, i)
        q = G.ggml_reshape_3d(ctx, self.linear(x, f"blk.{i}.attn_q"), hs, c.n_heads, N)  # (hs, nh, N)
        k = G.ggml_reshape_3d(ctx, self.linear(x, f"blk.{i}.attn_k"), hs, c.n_kv_heads, N)  # (hs, nkv, N)
        v = G.ggml_reshape_3d(ctx, self.linear(x, f"blk.{i}.attn_v"), hs, c.n_kv_heads, N)
        if self.has(f"blk.{i}.attn_q_norm.weight"):  # HybridNorm's QKV-norm, per head
            q, k, v = (self.rms_norm(t, f"blk.{i}.attn_{n}_norm.weight") for t, n in ((q, "q"), (k, "k"), (v, "v")))
        q, k = self.rope(q), self.rope(k)
        keys = self.cached(cache_k, G.ggml_reshape_2d(ctx, k, hs * c.n_kv_heads, N), rows)  # (hs, n_kv, nkv, B)
        values = self.cached(cache_v, G.ggml_reshape_2d(ctx, G.ggml_cont(ctx, v), hs * c.n_kv_heads, N), rows)
        q = G.ggml_permute(ctx, G.ggml_reshape_4d(ctx, q, hs, c.n_heads, T, B), 0, 2, 1, 3)  # (hs, T, nh, B)
        y = G.ggml_flash_attn_ext(ctx, q, keys, values, self.mask, 1.0 / math.sqrt(hs), 0.0, 0.0)  # (hs, nh, T, B)
        G.ggml_flash_attn_ext_set_prec(y, G.GGML_PREC_F32)
        return self.linear(G.ggml_reshape_2d(ctx, y, hs * c.n_heads, N), f"blk.{i}.attn_output")

    def ffn(self, x, i: int):
        """SwiGLU: down(silu(gate x) * up x)."""
        gate, up = self.linear(x, f"blk.{i}.ffn_gate"), self.linear(x, f"blk.{i}.ffn_up")
        return self.linear(G.ggml_swiglu_split(self.ctx, gate, up), f"blk.{i}.ffn_down")

    def residual(self, y, gate: str):
        """sigmoid(g) * y with a gated residual, y otherwise."""
        return G.ggml_mul(self.ctx, y, self.gates[gate]) if gate in self.gates else y

    def block(self, x, i: int, cache_k, cache_v, rows):
        """pre:    x = x + r(attn(norm(x)));  x = x + r(ffn(norm(x)))
        hybrid: x = x + r(attn(x)) (QKV-norm inside; block 0 pre-norms);  z = norm(x);  x = z + r(ffn(z))"""
        ctx = self.ctx
        h = self.rms_norm(x, f"blk.{i}.attn_norm.weight") if self.has(f"blk.{i}.attn_norm.weight") else x
        x = G.ggml_add(ctx, x, self.residual(self.attention(h, i, cache_k, cache_v, rows),
                                             f"blk.{i}.attn_residual_gate.weight"))
        gate = f"blk.{i}.ffn_residual_gate.weight"
        if self.c.norm == "hybrid":
            z = self.rms_norm(x, f"blk.{i}.ffn_norm.weight")
            return G.ggml_add(ctx, z, self.residual(self.ffn(z, i), gate))
        return G.ggml_add(ctx, x, self.residual(self.ffn(self.rms_norm(x, f"blk.{i}.ffn_norm.weight"), i), gate))

    def forward(self, ids, rows, cache_k: list, cache_v: list):
        """Logits (vocab, N), or (vocab, B) for the last position of each sequence."""
        ctx = self.ctx
        x = G.ggml_get_rows(ctx, self.w["token_embd.weight"], ids)  # (C, N), dequantized rows
        for i in range(self.c.n_layers):
            x = self.block(x, i, cache_k[i], cache_v[i], rows)
        if self.shape.last_only:
            B, T = self.shape.batch, self.shape.tokens
            row = x.contents.nb[1]
            x = G.ggml_cont(ctx, G.ggml_view_2d(ctx, x, self.c.d_model, B, T * row, (T - 1) * row))  # (C, B)
        h = self.rms_norm(x, "output_norm.weight")
        if self.has("output.weight") or self.has("output_a.weight"):
            return self.linear(h, "output")
        return G.ggml_mul_mat(ctx, self.w["token_embd.weight"], h)  # tied embeddings


def set_input(tensor, array) -> None:
    """Copy a contiguous numpy array into an allocated input tensor."""
    G.ggml_backend_tensor_set(tensor, array.ctypes.data_as(ctypes.c_void_p), 0, array.nbytes)
