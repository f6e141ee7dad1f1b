"""Seeded mutators: each takes a file's bytes and a `random.Random` and returns damaged bytes
and a short description. Generic ones (bit flips, truncation, overwritten length and count
fields) apply to any file; structured ones rewrite a safetensors file with another dtype,
shape or value in one tensor, a GGUF key with a hostile value, an ONNX graph's shapes or
types, or one JSON value. `mutate(kind, data, rng)` picks one that suits the file."""

from __future__ import annotations

import json
import math
import random
import struct

import numpy as np

# Values a length, count or size field is overwritten with: the extremes of every integer
# width a parser might use, off-by-ones, and sizes that only a bounded reader refuses.
HOSTILE_INTS = [0, 1, 2, 3, 7, 255, 256, 65535, 65536, 10**6, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                2**53, 2**63 - 1, 2**63, 2**64 - 1]
HOSTILE_JSON = [None, True, False, 0, -1, 1, 2, 3, 0.5, -0.0, 1e-300, 1e308, -1e308, float("nan"),
                float("inf"), 2**31 - 1, 2**31, 2**63, 10**30, "", "x", "\u0000", "🙂" * 3, [], [1, 2], {}, {"a": 1}]


# --- Generic mutators ---------------------------------------------------------------

def bit_flips(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    head = min(len(out), 4096)  # half the flips land in the header, where the structure is
    n = rng.randint(1, 8)
    for _ in range(n):
        i = rng.randrange(head) if rng.random() < 0.5 else rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out), f"{n} bit flips"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice([0, 1, 4, 8, 16, 24, rng.randrange(len(data)), rng.randrange(min(len(data), 4096))])
    return data[:cut], f"truncated to {cut} bytes"


def length_field(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Overwrite a little-endian u64 or u32 that looks like a length, count or offset (a
    value between 1 and the file size) with a hostile one."""
    head = data[:min(len(data), 1 << 16)]
    width = rng.choice([8, 4])
    fmt = "<Q" if width == 8 else "<I"
    spots = [i for i in range(len(head) - width + 1) if 0 < struct.unpack_from(fmt, head, i)[0] <= len(data)]
    if not spots:
        return bit_flips(data, rng)
    at = rng.choice(spots)
    old = struct.unpack_from(fmt, head, at)[0]
    new = rng.choice(HOSTILE_INTS + [old + 1, old - 1, old * 2, old * 1000]) % (1 << (8 * width))
    out = bytearray(data)
    struct.pack_into(fmt, out, at, new)
    return bytes(out), f"u{8 * width} at {at}: {old} -> {new}"


GENERIC = [bit_flips, truncate, length_field]


# --- JSON ---------------------------------------------------------------------------

def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:50]):  # a vocabulary's thousands of entries: a sample is enough
            yield from _paths(item, prefix + (i,))


def json_value(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Replace, delete or scale one value anywhere in the tree."""
    try:
        tree = json.loads(data)
    except ValueError:
        return bit_flips(data, rng)
    paths = [p for p in _paths(tree) if p]
    if not paths:
        return json.dumps(rng.choice(HOSTILE_JSON)).encode(), "replaced the whole document"
    path = rng.choice(paths)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    action = rng.random()
    if action < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        what = "deleted"
    elif action < 0.35 and isinstance(old, (int, float)) and not isinstance(old, bool):
        new = old * rng.choice([-1, 0, 2, 1000, 10**6, 10**9]) + rng.choice([0, 1, -1])
        parent[path[-1]] = new
        what = f"{old!r} -> {new!r}"
    else:
        new = rng.choice(HOSTILE_JSON)
        parent[path[-1]] = new
        what = f"-> {new!r}"
    return json.dumps(tree).encode(), f"{'.'.join(map(str, path))} {what}"


def json_nesting(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    depth = rng.choice([1000, 10**5, 10**6])
    return (b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth), \
        f"nested {depth} deep"


# --- safetensors ---------------------------------------------------------------------

def _load_st(data: bytes):
    from safetensors.torch import load

    return load(data)


def _save_st(tensors) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def st_dtype(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One tensor stored in another dtype, the file otherwise consistent."""
    import torch

    tensors = _load_st(data)
    name = rng.choice(sorted(tensors))
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8,
                        torch.uint8, torch.bool, torch.float32])
    tensors[name] = tensors[name].to(dtype)
    return _save_st(tensors), f"{name} as {dtype}"


def st_shape(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One tensor given another shape: transposed, flattened, another tensor's, or cut."""
    tensors = _load_st(data)
    names = sorted(tensors)
    name = rng.choice(names)
    t = tensors[name]
    choice = rng.randrange(4)
    if choice == 0 and t.dim() == 2:
        tensors[name] = t.t()
    elif choice == 1:
        tensors[name] = t.flatten()
    elif choice == 2:
        tensors[name] = tensors[rng.choice(names)].clone()
    else:
        tensors[name] = t.flatten()[: max(0, t.numel() - rng.randint(1, t.numel()))] if t.numel() else t
    return _save_st(tensors), f"{name} reshaped to {tuple(tensors[name].shape)}"


def st_values(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Hostile values in one tensor: NaN / inf in a float one, out-of-range in an integer one."""
    import torch

    tensors = _load_st(data)
    name = rng.choice(sorted(tensors))
    t = tensors[name].clone()
    if t.numel() == 0:
        return _save_st(tensors), f"{name} left empty"
    flat = t.view(-1)
    idx = torch.tensor(rng.sample(range(flat.numel()), min(flat.numel(), rng.choice([1, 3, 100]))))
    if t.is_floating_point():
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
    else:
        info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
        value = rng.choice([-1, 2**15, info.max if info else 1, info.min if info else 0, 10**6 if info and info.bits >= 32 else 0])
    flat[idx] = value
    tensors[name] = t
    return _save_st(tensors), f"{name}: {len(idx)} values -> {value}"


def st_drop(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    tensors = _load_st(data)
    name = rng.choice(sorted(tensors))
    del tensors[name]
    return _save_st(tensors), f"dropped {name}"


# --- GGUF ---------------------------------------------------------------------------

def gguf_key(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Rewrite the file with one key's value replaced (same type, or another), or one
    tensor's type or shape changed, through gguf-py's own writer."""
    import tempfile
    from pathlib import Path

    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.gguf", Path(tmp) / "out.gguf"
        src.write_bytes(data)
        reader = GGUFReader(src)
        arch = reader.fields["general.architecture"].contents()
        keys = [k for k in reader.fields if not k.startswith("GGUF.") and k != "general.architecture"]
        target = rng.choice(keys)
        tensor_edit = rng.random() < 0.3
        tname = rng.choice([t.name for t in reader.tensors])
        writer = GGUFWriter(out, arch)
        what = ""
        for key in keys:
            field = reader.fields[key]
            value, vtype = field.contents(), field.types[0]
            if key == target and not tensor_edit:
                if vtype == GGUFValueType.ARRAY:
                    choice = rng.randrange(3)
                    value = value[: rng.randrange(len(value) + 1)] if choice == 0 else \
                        value + value[: rng.randint(1, 100)] if choice == 1 else [rng.choice([-1, 2**31 - 1, 3])] * 5
                    what = f"{key}: array of {len(value)}"
                    writer.add_array(key, value)
                    continue
                if vtype in (GGUFValueType.STRING,):
                    value = rng.choice(["", "llama", "fanformer", "gpt2", "x" * 1000, "🙂"])
                elif vtype == GGUFValueType.BOOL:
                    value = not value
                elif vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
                    value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30])
                else:
                    value = rng.choice([0, 1, 2, 3, 1000, 10**6, 2**31 - 1, 2**32 - 1])
                    vtype = rng.choice([vtype, GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64])
                    if vtype == GGUFValueType.INT32:
                        value = min(value, 2**31 - 1)
                what = f"{key} -> {value!r} ({vtype.name})"
            if vtype == GGUFValueType.ARRAY:
                writer.add_array(key, value)
            else:
                writer.add_key_value(key, value, vtype)
        for t in reader.tensors:
            array, qtype = np.array(t.data), t.tensor_type
            if tensor_edit and t.name == tname:
                if rng.random() < 0.5 and qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                    array = array.astype(np.float16 if qtype == GGMLQuantizationType.F32 else np.float32)
                    qtype = GGMLQuantizationType.F16 if qtype == GGMLQuantizationType.F32 else GGMLQuantizationType.F32
                elif qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and rng.random() < 0.5:
                    array = array.copy()
                    array.reshape(-1)[: rng.choice([1, 10])] = rng.choice([np.nan, np.inf])
                else:
                    array = array.reshape(-1)[: max(1, array.size // 2)].copy() if qtype in (
                        GGMLQuantizationType.F32, GGMLQuantizationType.F16) else array[: max(1, array.shape[0] // 2)]
                what = f"tensor {t.name}: {qtype.name} {array.shape}"
            writer.add_tensor(t.name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return out.read_bytes(), what


# --- ONNX ---------------------------------------------------------------------------

def onnx_graph(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """An initializer's dims or data type changed, a graph input's shape changed, a node
    dropped, or an attribute changed, through the onnx library."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    choice = rng.randrange(5)
    if choice == 0 and graph.initializer:
        init = rng.choice(list(graph.initializer))
        if init.dims:
            i = rng.randrange(len(init.dims))
            init.dims[i] = rng.choice([0, 1, init.dims[i] + 1, 2**31 - 1, 2**40])
        what = f"initializer {init.name} dims -> {list(init.dims)}"
    elif choice == 1 and graph.initializer:
        init = rng.choice(list(graph.initializer))
        init.data_type = rng.choice([1, 2, 3, 6, 7, 10, 11, 16])
        what = f"initializer {init.name} type -> {init.data_type}"
    elif choice == 2:
        value = rng.choice(list(graph.input) + list(graph.output))
        dims = value.type.tensor_type.shape.dim
        if dims:
            d = rng.choice(list(dims))
            d.dim_value = rng.choice([1, 3, 7, 2**31 - 1])
        what = f"{value.name} shape changed"
    elif choice == 3 and graph.node:
        node = rng.choice(list(graph.node))
        graph.node.remove(node)
        what = f"node {node.name} ({node.op_type}) dropped"
    else:
        nodes = [n for n in graph.node if n.attribute]
        if not nodes:
            return bit_flips(data, rng)
        node = rng.choice(nodes)
        attr = rng.choice(list(node.attribute))
        if attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice([-1, 0, 2**31 - 1, 2**62])
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice([math.nan, math.inf, 0.0])
        elif attr.type == onnx.AttributeProto.INTS and attr.ints:
            attr.ints[rng.randrange(len(attr.ints))] = rng.choice([-1, 0, 2**31 - 1])
        what = f"node {node.name} attribute {attr.name} changed"
    return model.SerializeToString(), what


# --- Which mutators suit which file --------------------------------------------------

MUTATORS = {
    "json": GENERIC + [json_value] * 6 + [json_nesting],
    "safetensors": GENERIC + [st_dtype, st_dtype, st_shape, st_shape, st_values, st_values, st_drop],
    "gguf": GENERIC + [length_field, length_field, gguf_key, gguf_key, gguf_key],
    "onnx": GENERIC + [onnx_graph] * 4,
}


def family(target: str) -> str:
    return "json" if target.endswith(".json") else target.rsplit(".", 1)[-1]


def mutate(target: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Damage `data`, the content of the file named `target`; (new bytes, what was done)."""
    mutator = rng.choice(MUTATORS[family(target)])
    try:
        out, what = mutator(data, rng)
    except Exception as err:  # a structured rewrite the library refuses: fall back to flips
        out, what = bit_flips(data, rng)
        what += f" ({mutator.__name__} unavailable: {type(err).__name__})"
    return out, f"{mutator.__name__}: {what}"
