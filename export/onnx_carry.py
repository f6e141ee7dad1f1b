"""ONNX export of a quantized checkpoint (`fanformer quantize`): its GPTQ integers carried
into `com.microsoft.MatMulNBits` nodes as they are, without quantizing again.

The float graph is exported from the dequantized model (each QuantLinear replaced by an
nn.Linear holding exactly scales * (codes - zeros)); then every MatMul whose weight is a
quantized layer's dequantized W^T is found by its values and replaced by a MatMulNBits
node built from the checkpoint's codes, scales and zero points:

    B            uint8 [N, n_blocks, block_size * bits / 8]   codes along K, low bits first
    scales       float [N * n_blocks]                        the checkpoint's fp16 scales
    zero_points  uint8 [N * ceil(n_blocks * bits / 8)]       zero = GPTQ v1 stored zero + 1
    W[k, n] = scales[n, k // block_size] * (B[n, k] - zero_points[n, k // block_size])

which is the checkpoint's own W[o, i] = scales[g, o] * (code[i, o] - (qzero[g, o] + 1))
with g = g_idx[i] = i // group_size. Only what MatMulNBits can hold exactly is carried:
4 or 8 bits, a trivial g_idx (no act-order permutation), a power-of-two group size of at
least 16 (a per-channel group of -1 when the input width is one), zero points below 2^bits.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from fanformer.errors import FANformerError
from fanformer.quant.linear import QuantLinear
from fanformer.quant.packing import unpack

CARRY_BITS = (4, 8)
MS_DOMAIN = "com.microsoft"


def _block_size(group_size: int, in_features: int) -> int:
    block = in_features if group_size == -1 else group_size
    if block < 16 or block & (block - 1):
        what = (f"per-channel group_size -1 (one group of the whole input width {in_features})"
                if group_size == -1 else f"group_size {group_size}")
        raise FANformerError(f"cannot carry {what} into ONNX MatMulNBits: its block size must be a power of two "
                             ">= 16; export the float checkpoint with --quantize instead")
    if in_features % block:
        raise FANformerError(f"cannot carry group_size {group_size} into ONNX MatMulNBits: the input width "
                             f"{in_features} is not a multiple of it")
    return block


def check_carry(qconfig: dict) -> None:
    """Refuse, with one FANformerError, a quantization_config MatMulNBits cannot hold."""
    bits, group_size = qconfig.get("bits"), qconfig.get("group_size")
    if bits not in CARRY_BITS:
        raise FANformerError(f"cannot carry {bits}-bit weights into ONNX: MatMulNBits exports support "
                             f"{' or '.join(map(str, CARRY_BITS))} bits; export the float checkpoint instead")
    if group_size != -1 and (not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1)):
        raise FANformerError(f"cannot carry group_size {group_size!r} into ONNX MatMulNBits: it needs a power of "
                             "two >= 16")


def layer_integers(layer: QuantLinear) -> dict:
    """One QuantLinear's MatMulNBits tensors (numpy) and attributes; raises if not exact."""
    codes, scales, zeros, g_idx = unpack(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits)
    n, k = codes.shape  # (out, in)
    bits = layer.bits
    if bits not in CARRY_BITS:
        raise FANformerError(f"cannot carry {bits}-bit weights into ONNX MatMulNBits (4 or 8 bits only)")
    block = _block_size(layer.group_size, k)
    n_blocks = k // block
    if not torch.equal(g_idx.long(), torch.arange(k) // block):
        raise FANformerError("cannot carry act-order (desc_act) weights into ONNX MatMulNBits: the checkpoint's "
                             "g_idx is not the trivial i // group_size, and MatMulNBits has no column permutation")
    if scales.shape[1] != n_blocks:
        raise FANformerError(f"unexpected scales shape {tuple(layer.scales.shape)} for group_size {layer.group_size}")
    if int(zeros.max()) >= 2 ** bits or int(zeros.min()) < 0:
        raise FANformerError(f"cannot carry a zero point of {int(zeros.max())} into {bits}-bit MatMulNBits "
                             f"(zero points must be below {2 ** bits})")
    c = codes.numpy().astype(np.uint8)  # (N, K)
    z = zeros.numpy().astype(np.uint8)  # (N, n_blocks)
    if bits == 4:
        b = (c[:, 0::2] | (c[:, 1::2] << 4)).reshape(n, n_blocks, block // 2)
        if n_blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)
    else:
        b = c.reshape(n, n_blocks, block)
        zp = z.reshape(-1)
    return {"B": np.ascontiguousarray(b), "scales": layer.scales.t().float().numpy().reshape(-1).copy(),
            "zero_points": np.ascontiguousarray(zp), "K": k, "N": n, "bits": bits, "block_size": block}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def carry_into(path, layers: dict[str, QuantLinear], accuracy_level: int = 0) -> int:
    """Replace in the ONNX file `path` each MatMul by one quantized layer's dequantized
    weight with a MatMulNBits node holding that layer's integers; returns how many.
    Every quantized layer must be found (by the exact values of its W^T initializer)."""
    model = onnx.load(str(path))
    graph = model.graph
    wanted: dict[str, list[str]] = {}
    for name, layer in layers.items():
        wanted.setdefault(_digest(layer.dequantized_weight().t().numpy()), []).append(name)
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, list] = {}
    new_nodes, used = [], set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if weight in initializers:
            array = numpy_helper.to_array(initializers[weight])
        elif weight in producers and producers[weight].op_type == "Transpose" \
                and producers[weight].input[0] in initializers:
            array = numpy_helper.to_array(initializers[producers[weight].input[0]]).T
        else:
            new_nodes.append(node)
            continue
        names = wanted.get(_digest(array)) if array.ndim == 2 and array.dtype == np.float32 else None
        if not names:
            new_nodes.append(node)
            continue
        name = names[0]  # layers with identical weights carry identical integers
        t = layer_integers(layers[name])
        prefix = f"{name}.nbits"
        if prefix not in used:
            used.add(prefix)
            graph.initializer.extend([numpy_helper.from_array(t["B"], f"{prefix}.B"),
                                      numpy_helper.from_array(t["scales"], f"{prefix}.scales"),
                                      numpy_helper.from_array(t["zero_points"], f"{prefix}.zero_points")])
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{prefix}.B", f"{prefix}.scales", f"{prefix}.zero_points"],
            list(node.output), name=f"{node.name or name}_MatMulNBits", domain=MS_DOMAIN,
            K=t["K"], N=t["N"], bits=t["bits"], block_size=t["block_size"], accuracy_level=accuracy_level))
        for n in names:
            found.setdefault(n, []).append(node.name)
    missing = sorted(set(layers) - set(found))
    if missing:
        raise FANformerError(f"ONNX export: no MatMul of the exported graph holds the quantized weight of "
                             f"{', '.join(missing)}; cannot carry its integers")
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop float initializers no node reads any more.
    read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return sum(len(v) for v in found.values())
