"""The fused-kernel ONNX decoder: FANformer written node by node in onnxruntime's contrib
ops, the graph onnxruntime-genai's model builder writes for Llama, with FANformer's parts
spelled out where they go.

Per block (https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md):

- residual add + RMSNorm -> `SkipSimplifiedLayerNormalization` (one pass; its sum output
  is the next residual), the first norm -> `SimplifiedLayerNormalization`;
- the FAN projection is a MatMul with bias whose output is split into P and G and
  concatenated as [cos(P) || sin(P) || G] (GELU on G for the full FAN layer), feeding Q/K/V;
- Q, K and V are one packed MatMul where the layers are plain linears; CoLA layers
  `B silu(A x)` have their three A factors packed into one MatMul and one SiLU, split,
  then a B factor each; HybridNorm's per-head Q/K/V RMSNorms (SimplifiedLayerNormalization
  over head_dim) are separate nodes;
- `GroupQueryAttention` does RoPE (do_rotary, rotate-half), causal GQA and the KV cache in
  one kernel; past and present may be one preallocated buffer (genai's
  past_present_share_buffer, our ONNX backend's IO binding);
- SwiGLU's gate and up projections are one packed MatMul (CoLA: their A factors), then
  Sigmoid/Mul;
- gated residuals `sigmoid(g) * f(x)` are folded into the output rows of the layer that
  ends f (o_proj, down_proj, or CoLA's B factor; for carried integers, into its scales).

Positions. GQA rotates by cache slot: a token at slot s of a row gets position s. Our
model gives left padding no positions (a row's first real token is position 0), so a
left-padded row here is rotated by its pad count more than in PyTorch -- the same shift
for every token of the row, to which attention is blind (RoPE scores depend on position
differences only). The logits agree to float rounding, and the graph needs no
position_ids input. Padded keys are masked by an additive attention_bias built from
attention_mask; `seqlens_k` is every row's slot count minus one.

Weights come from the float model, or, for a quantized checkpoint, from its integers
(export/onnx_carry.py's `layer_integers`), written straight into MatMulNBits nodes. A
float graph is quantized afterwards by export/onnx_quant.py as the plain graph is.

No maintained tool writes this graph for FANformer (onnxruntime-genai's builder knows only
the architectures it was written for; onnxruntime's transformer optimizer fuses only
known attention patterns), hence this module.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fanformer.errors import FANformerError
from fanformer.export import onnx_format as names
from fanformer.export.onnx_carry import MS_DOMAIN, layer_integers
from fanformer.model import CoLALinear, FANformer, RMSNorm
from fanformer.quant.linear import QuantLinear

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
# Additive bias on padded keys: far below any score, yet finite in the graph's dtype, so a
# padded query that sees only padded keys gets a finite (unused) row instead of NaN.
MASKED = {"fp32": -1e9, "fp16": -1e4}


def unsupported(model: FANformer) -> str | None:
    """Why `model` has no fused graph (then the plain graph is exported), or None."""
    c = model.config
    if c.mixer != "attention":
        return f"the {c.mixer} token mixer has no fused kernel (GroupQueryAttention is attention only)"
    if c.head != "linear":
        return f"the {c.head} LM head has no fused kernel"
    if c.head_dim % 2:
        return f"GroupQueryAttention's rotary needs an even head_dim, got {c.head_dim}"
    return None


class _Graph:
    """Nodes and initializers under construction; names are made unique by a counter."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d
        return name

    def weight(self, hint: str, tensor: torch.Tensor) -> str:
        """A float parameter in the graph's dtype."""
        return self.const(hint, tensor.detach().float().numpy().astype(NP_DTYPES[self.dtype]))

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs):
        hint = op_type.lower()
        out = [self.name(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out, name=self.name(op_type), domain=domain, **attrs))
        return out[0] if outputs == 1 else out


class FusedBuilder:
    """Writes one FANformer (float, or with quantized layers in `carried`) as a fused graph."""

    # Pack the layers that read one input (`projects`); benchmarks/shared_inputs.py turns it
    # off to measure what packing gains.
    pack = True

    def __init__(self, model: FANformer, dtype: str = "fp32", carried: dict[str, QuantLinear] | None = None,
                 accuracy_level: int = 0):
        self.model, self.config = model.eval(), model.config
        self.carried = carried or {}
        self.accuracy_level = accuracy_level
        self.g = _Graph(dtype)
        self.module_names = {m: n for n, m in model.named_modules()}

    # --- Linears ------------------------------------------------------------------

    def linear(self, x: str, layers: list[nn.Module], out_scale: torch.Tensor | None = None) -> str:
        """x @ [W_1; W_2; ...]^T (+ biases) as one node: a MatMul over float weights or a
        MatMulNBits over carried integers; `out_scale` multiplies the output columns."""
        layer_names = [self.module_names[layer] for layer in layers]
        quantized = [self.carried.get(name) for name in layer_names]
        if any(quantized) and not all(quantized):  # mixed: emit apart, concatenate
            return self.g.op("Concat", [self.linear(x, [layer]) for layer in layers], axis=-1)
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(layer.out_features)
                              for b, layer in zip(biases, layers)])
        if all(quantized):
            y = self._matmul_nbits(x, quantized, layer_names[0], out_scale, bias)
        else:
            w = torch.cat([layer.weight.detach().float() for layer in layers])  # (N, K)
            if out_scale is not None:
                w = w * out_scale[:, None]
            y = self.g.op("MatMul", [x, self.g.weight(f"{layer_names[0]}.weight_T", w.t())])
            if bias is not None:
                y = self.g.op("Add", [y, self.g.weight(f"{layer_names[0]}.bias", bias * (out_scale if out_scale
                                                                                      is not None else 1))])
        return y

    def _matmul_nbits(self, x: str, layers: list[QuantLinear], prefix: str, out_scale, bias) -> str:
        parts = [layer_integers(layer) for layer in layers]
        shape = {(p["K"], p["bits"], p["block_size"]) for p in parts}
        if len(shape) > 1:  # cannot pack: one node each (biases and scales apply per layer)
            outs, start = [], 0
            for layer in layers:
                end = start + layer.out_features
                outs.append(self._matmul_nbits(
                    x, [layer], f"{prefix}.{len(outs)}", None if out_scale is None else out_scale[start:end],
                    None if bias is None else bias[start:end]))
                start = end
            return self.g.op("Concat", outs, axis=-1)
        k, bits, block = shape.pop()
        n = sum(p["N"] for p in parts)
        b = np.concatenate([p["B"] for p in parts])
        scales = np.concatenate([p["scales"].reshape(p["N"], -1) for p in parts])
        zeros = np.concatenate([p["zero_points"].reshape(p["N"], -1) for p in parts])
        if out_scale is not None:
            scales = scales * out_scale.numpy()[:, None]
        inputs = [x, self.g.const(f"{prefix}.B", b),
                  self.g.const(f"{prefix}.scales", scales.astype(NP_DTYPES[self.g.dtype]).reshape(-1)),
                  self.g.const(f"{prefix}.zero_points", zeros.reshape(-1))]
        if bias is not None:
            inputs += ["", self.g.weight(f"{prefix}.bias", bias * (out_scale if out_scale is not None else 1))]
        return self.g.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                         accuracy_level=self.accuracy_level)

    def project(self, x: str, module: nn.Module, out_scale: torch.Tensor | None = None) -> str:
        """One layer of the model: a linear, or CoLA's B silu(A x)."""
        if isinstance(module, CoLALinear):
            return self.linear(self.silu(self.linear(x, [module.lora_a])), [module.lora_b], out_scale)
        return self.linear(x, [module], out_scale)

    def projects(self, x: str, modules: list[nn.Module]) -> list[str]:
        """Layers that read one input x (Q, K and V; gate and up) in as few nodes as
        possible: plain linears as one packed node, split; CoLA layers with their A factors
        packed (one MatMul and one SiLU for the group), split, then each B factor."""
        if not self.pack:
            return [self.project(x, m) for m in modules]
        if all(isinstance(m, CoLALinear) for m in modules):
            h = self.silu(self.linear(x, [m.lora_a for m in modules]))
            parts = self.split(h, [m.rank for m in modules])
            return [self.linear(part, [m.lora_b]) for part, m in zip(parts, modules)]
        if all(isinstance(m, nn.Linear) for m in modules):
            return self.split(self.linear(x, modules), [m.out_features for m in modules])
        return [self.project(x, m) for m in modules]

    def split(self, x: str, widths: list[int]) -> list[str]:
        """x's last axis cut into parts of `widths`."""
        return self.g.op("Split", [x, self.g.const("split", np.array(widths, np.int64))], outputs=len(widths),
                         axis=-1)

    def silu(self, x: str) -> str:
        return self.g.op("Mul", [x, self.g.op("Sigmoid", [x])])

    # --- Norms --------------------------------------------------------------------

    def norm(self, x: str, norm: RMSNorm) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self.g.weight("norm.weight", norm.weight)],
                         axis=-1, epsilon=norm.eps)

    def add_norm(self, x: str, delta: str | None, norm: RMSNorm) -> tuple[str, str]:
        """(norm(x + delta), x + delta), with the add fused into the norm."""
        if delta is None:
            return self.norm(x, norm), x
        normed, _, _, total = self.g.op("SkipSimplifiedLayerNormalization",
                                        [delta, x, self.g.weight("norm.weight", norm.weight)], outputs=4,
                                        domain=MS_DOMAIN, epsilon=norm.eps)
        return normed, total

    def head_norm(self, x: str, heads: int, norm: RMSNorm) -> str:
        """RMSNorm per head: (B, S, heads * hs) -> (B, S, heads, hs) -> norm -> back."""
        shape = self.g.const("heads_shape", np.array([0, 0, heads, self.config.head_dim], np.int64))
        y = self.norm(self.g.op("Reshape", [x, shape]), norm)
        return self.g.op("Reshape", [y, self.g.const("flat_shape", np.array([0, 0, -1], np.int64))])

    # --- Blocks -------------------------------------------------------------------

    def fan(self, x: str, fan) -> str:
        h = self.project(x, fan.proj)
        dp, dg = self.config.d_periodic, self.config.d_plain
        if dg == 0:
            return self.g.op("Concat", [self.g.op("Cos", [h]), self.g.op("Sin", [h])], axis=-1)
        p, g = self.g.op("Split", [h, self.g.const("split", np.array([dp, dg], np.int64))], outputs=2, axis=-1)
        if fan.activation == "gelu":
            g = self.g.op("Gelu", [g])
        return self.g.op("Concat", [self.g.op("Cos", [p]), self.g.op("Sin", [p]), g], axis=-1)

    def attention(self, x: str, attn, gate, layer: int, common: dict) -> str:
        c = self.config
        if attn.fan is not None:
            x = self.fan(x, attn.fan)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if not attn.qkv_norm and all(isinstance(p, nn.Linear) for p in projections):
            q, k, v = self.linear(x, list(projections)), "", ""  # packed QKV
        else:
            q, k, v = self.projects(x, list(projections))
            if attn.qkv_norm:
                q = self.head_norm(q, c.n_heads, attn.q_norm)
                k = self.head_norm(k, c.n_kv_heads, attn.k_norm)
                v = self.head_norm(v, c.n_kv_heads, attn.v_norm)
        y, present_k, present_v = self.g.op(
            "GroupQueryAttention",
            [q, k, v, names.PAST_KEY % layer, names.PAST_VALUE % layer, common["seqlens_k"], common["total"],
             common["cos"], common["sin"], "", common["bias"]],
            outputs=3, domain=MS_DOMAIN, num_heads=c.n_heads, kv_num_heads=c.n_kv_heads, do_rotary=1,
            rotary_interleaved=0, scale=1 / math.sqrt(c.head_dim))
        self.g.nodes[-1].output[1:] = [names.PRESENT_KEY % layer, names.PRESENT_VALUE % layer]
        return self.project(y, attn.o_proj, _gate(gate))

    def ffn(self, x: str, ffn, gate) -> str:
        g, u = self.projects(x, [ffn.gate_proj, ffn.up_proj])
        return self.project(self.g.op("Mul", [self.silu(g), u]), ffn.down_proj, _gate(gate))

    def common_inputs(self) -> dict:
        """seqlens_k, total_sequence_length, RoPE tables and the padding bias, from the mask."""
        g, c = self.g, self.config
        shape = g.op("Shape", [names.ATTENTION_MASK])  # [B, total]
        total64 = g.op("Gather", [shape, g.const("one", np.array(1, np.int64))], axis=0)  # scalar
        total = g.op("Cast", [total64], to=TensorProto.INT32)
        batch = g.op("Slice", [shape, g.const("zero", np.array([0], np.int64)),
                               g.const("one", np.array([1], np.int64))])  # [B]
        last = g.op("Sub", [total, g.const("one", np.array(1, np.int32))])
        seqlens_k = g.op("Expand", [last, batch])  # (B,) every row's slots - 1
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
        # The angles as fanformer.model.rope_cos_sin computes them (fp32), then the graph's dtype.
        angles = torch.arange(c.max_seq_len, dtype=torch.float32)[:, None] * torch.from_numpy(inv_freq)[None]
        assert angles.shape[1] == half
        cos, sin = g.weight("cos_cache", angles.cos()), g.weight("sin_cache", angles.sin())
        # Padded keys: MASKED where attention_mask is 0, shaped (B, 1, S, total).
        real = g.op("Cast", [names.ATTENTION_MASK], to=ONNX_DTYPES[g.dtype])
        bias = g.op("Mul", [g.op("Sub", [g.const("one", np.array(1, NP_DTYPES[g.dtype])), real]),
                            g.const("masked", np.array(MASKED[g.dtype], NP_DTYPES[g.dtype]))])
        bias = g.op("Unsqueeze", [bias, g.const("axes", np.array([1, 2], np.int64))])  # (B, 1, 1, total)
        seq = g.op("Slice", [g.op("Shape", [names.INPUT_IDS]), g.const("one", np.array([1], np.int64)),
                             g.const("two", np.array([2], np.int64))])  # [S]
        target = g.op("Concat", [batch, g.const("one", np.array([1], np.int64)), seq,
                                 g.op("Unsqueeze", [total64, g.const("axes", np.array([0], np.int64))])], axis=0)
        bias = g.op("Expand", [bias, target])
        return {"seqlens_k": seqlens_k, "total": total, "cos": cos, "sin": sin, "bias": bias}

    def build(self) -> onnx.ModelProto:
        m, g = self.model, self.g
        common = self.common_inputs()
        x = g.op("Gather", [g.weight("embed.weight", m.embed.weight), names.INPUT_IDS], axis=0)  # (B, S, C)
        delta = None  # the residual is x + delta; the add is fused into the next norm
        with torch.no_grad():
            for i, block in enumerate(m.blocks):
                if block.attn_norm is not None:
                    h, x = self.add_norm(x, delta, block.attn_norm)
                else:
                    x = x if delta is None else g.op("Add", [x, delta])
                    h = x
                a = self.attention(h, block.attn, block.attn_gate, i, common)
                if block.post_norm_ffn:  # HybridNorm: z = norm(x + a); x = z + ffn(z)
                    x, _ = self.add_norm(x, a, block.ffn_norm)
                    h = x
                else:
                    h, x = self.add_norm(x, a, block.ffn_norm)
                delta = self.ffn(h, block.ffn, block.ffn_gate)
            h, _ = self.add_norm(x, delta, m.norm)
            logits = self.project(h, m.lm_head)
        g.nodes.append(helper.make_node("Identity", [logits], [names.LOGITS], name="logits"))
        return self._model()

    def _model(self) -> onnx.ModelProto:
        c, dtype = self.config, ONNX_DTYPES[self.g.dtype]
        kv = [names.BATCH, c.n_kv_heads, names.PAST_SEQUENCE, c.head_dim]
        inputs = [helper.make_tensor_value_info(names.INPUT_IDS, TensorProto.INT64, [names.BATCH, names.SEQUENCE]),
                  helper.make_tensor_value_info(names.ATTENTION_MASK, TensorProto.INT64,
                                                [names.BATCH, names.TOTAL_SEQUENCE])]
        inputs += [helper.make_tensor_value_info(name, dtype, kv) for name in names.past_names(c.n_layers)]
        outputs = [helper.make_tensor_value_info(names.LOGITS, dtype, [names.BATCH, names.SEQUENCE, c.vocab_size])]
        present = [names.BATCH, c.n_kv_heads, "present_sequence_length", c.head_dim]
        outputs += [helper.make_tensor_value_info(name, dtype, present) for name in names.present_names(c.n_layers)]
        graph = helper.make_graph(self.g.nodes, "fanformer_fused", inputs, outputs, self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", names.OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="fanformer")
        model.ir_version = 10  # onnxruntime 1.27 reads up to 10
        return model


def _gate(gate: torch.Tensor | None) -> torch.Tensor | None:
    return None if gate is None else torch.sigmoid(gate.detach().float())


def build_fused(model: FANformer, dtype: str = "fp32", carried: dict[str, QuantLinear] | None = None,
                accuracy_level: int = 0) -> onnx.ModelProto:
    """The fused graph of `model`; raises FANformerError if the model has none (`unsupported`)."""
    reason = unsupported(model)
    if reason:
        raise FANformerError(f"no fused ONNX graph for this model: {reason}")
    return FusedBuilder(model, dtype, carried, accuracy_level).build()


# protobuf's limit on one message: larger models keep their weights in DATA_FILE.
PROTOBUF_LIMIT = 2 ** 31 - 1


def save(model: onnx.ModelProto, folder) -> None:
    """Write `model` as folder/model.onnx, its weights external (model.onnx.data) when the
    whole would pass protobuf's 2 GB limit, as torch.onnx's exporter does."""
    path = str(folder / names.MODEL_FILE)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT - 2 ** 26
    onnx.save_model(model, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=names.DATA_FILE, size_threshold=1024)
