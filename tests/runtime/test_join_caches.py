"""`Backend.join_caches`, the capability batched serving rests on: a cache rebuilt from
rows of other caches (some dropped, others added, the left padding trimmed) decodes each
sequence exactly as the uncached forward of that sequence alone."""

import pytest
import torch

from fanformer.export import export
from fanformer.export.gguf_export import export_gguf
from fanformer.runtime import load_backend
from fanformer.runtime.gguf_backend import ggml_missing


@pytest.fixture(scope="module")
def gguf_f32(checkpoint, tmp_path_factory):
    return export_gguf(checkpoint, tmp_path_factory.mktemp("join") / "f32.gguf", type="f32")


@pytest.fixture(scope="module")
def onnx_folders(checkpoint, tmp_path_factory):
    """The fused graph (keys rotated by cache slot: a join must turn them on) in fp32 and
    fp16, and the plain graph (positions from the mask)."""
    root = tmp_path_factory.mktemp("join-onnx")
    return {"onnx-fused": export(checkpoint, "onnx", root / "fused"),
            "onnx-fused-fp16": export(checkpoint, "onnx", root / "fp16", dtype="fp16"),
            "onnx-plain": export(checkpoint, "onnx", root / "plain", optimize=False)}


# Logits tolerance: fp16 keys and values round at 1e-3.
TOLERANCE = {"onnx-fused-fp16": 2e-2}


@pytest.fixture(params=["pytorch", "gguf-ggml", "gguf-torch", "onnx-fused", "onnx-fused-fp16", "onnx-plain"])
def backend(request, checkpoint, gguf_f32, onnx_folders):
    if request.param == "pytorch":
        return load_backend(checkpoint, device="cpu")
    if request.param.startswith("onnx"):
        return load_backend(onnx_folders[request.param], device="cpu")
    engine = request.param.split("-")[1]
    if engine == "ggml" and ggml_missing() is not None:
        pytest.skip(f"ggml-python does not load: {ggml_missing()}")
    return load_backend(gguf_f32, engine=engine)


def left_padded(backend, sequences):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), backend.info.pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids, mask


def test_joined_cache_decodes_each_sequence_as_alone(backend, request):
    assert backend.batching
    tolerance = TOLERANCE.get(request.node.callspec.params["backend"], 1e-4)
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randint(3, backend.info.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 3, 6))
    first = backend.new_cache(2)  # a (the longest) and b, then two decode steps
    ids, mask = left_padded(backend, [a, b])
    backend.prefill(first, ids, mask)
    for step in range(2):
        tokens = torch.randint(3, backend.info.vocab_size, (2, 1), generator=g)
        mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
        backend.decode(first, tokens, mask)
        a, b = a + [int(tokens[0])], b + [int(tokens[1])]
    second = backend.new_cache(2)  # c and d
    backend.prefill(second, *left_padded(backend, [c, d]))
    # a leaves (and with it 4 positions of padding for the others), b stays, c and d join in reverse order.
    length = max(len(b), len(c), len(d))
    joined = backend.join_caches([(first, [1]), (second, [1, 0])], length)
    rows = [b, d, c]
    new = torch.randint(3, backend.info.vocab_size, (3, 1), generator=g)
    mask = torch.zeros((3, length + 1), dtype=torch.long)
    for i, row in enumerate(rows):
        mask[i, length - len(row):] = 1
    for step in range(2):  # the joined cache keeps decoding
        logits = backend.decode(joined, new, mask)[:, -1]
        rows = [row + [int(t)] for row, t in zip(rows, new[:, 0])]
        for i, row in enumerate(rows):
            alone = backend.score(torch.tensor([row]))[0, -1]
            torch.testing.assert_close(logits[i], alone, atol=tolerance, rtol=tolerance)
        new = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.long)], dim=1)
    # The parts stay valid: the first cache still decodes a and b.
    tokens = torch.tensor([[5], [6]])
    mask = torch.ones((2, len(a) + 1), dtype=torch.long)
    mask[1, :len(a) - len(b)] = 0
    logits = backend.decode(first, tokens, mask)[:, -1]
    torch.testing.assert_close(logits[1], backend.score(torch.tensor([b + [6]]))[0, -1], atol=tolerance,
                               rtol=tolerance)


def test_backends_that_cannot_join_say_so(fake_backend):
    backend = fake_backend(lambda prefix: torch.zeros(8), vocab_size=8)
    assert not backend.batching
    with pytest.raises(NotImplementedError, match="one sequence at a time"):
        backend.join_caches([], 0)
