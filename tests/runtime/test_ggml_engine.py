"""Tests for the GGUF backend's ggml engine (runtime/ggml_engine.py, runtime/ggml_graph.py)
against its reference, the torch engine, on the same files: logits of every weight type
within a stated bound, every architecture option, greedy tokens over 64 steps, cached
decode against the uncached forward, left-padded batches, graph and cache reuse, threads,
weights left in the file.

The bound per type is on max |ggml - torch| / max |torch| over the logits of the overfit
tiny model (peaked, as a trained model's are). The two engines round differently around
the same weights: ggml's kernels take f16 activations for f16 weights, bf16 for bf16 and
8-bit blocks (Q8_0) for every q* type (the tiny model's heads are 16 wide, so its KV
cache is f32: `default_kv_type`; the cached-decode test runs an f16 cache too); the
torch engine keeps fp32 activations for float weights and rounds them to bf16 for q*
ones. Each bound is about twice the largest difference measured.
"""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from fanformer.checkpoint import save_checkpoint
from fanformer.errors import FANformerError
from fanformer.export import gguf_format as names
from fanformer.export.gguf_export import export_gguf
from fanformer.model import attention_bias
from fanformer.runtime import load_backend
from fanformer.runtime.gguf_backend import ggml_missing

pytestmark = pytest.mark.skipif(ggml_missing() is not None, reason=f"ggml-python does not load: {ggml_missing()}")
log = logging.getLogger(__name__)
TEXT = "def add(a, b):\n    return a + b\nFourier features: cos, sin, période π ≈ 3.14 🙂\n" * 2  # the overfit text

# max |ggml - torch| / max |torch| on the overfit model's logits (see the module docstring).
# Measured: f32 2.8e-7, f16 4.4e-4, bf16 2.5e-3, q8_0 1.2e-2, q5_1 1.2e-2, q5_0 7.9e-3,
# q4_1 7.1e-3, q4_0 6.9e-3.
TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "bf16": 5e-3, "q8_0": 2.5e-2, "q5_1": 2.5e-2, "q5_0": 2e-2, "q4_1": 2e-2,
             "q4_0": 2e-2}
OPTIONS = {
    "hybrid-gates-gelu": dict(norm="hybrid", gated_residual=True, fan_activation="gelu"),
    "cola": dict(cola_rank=0.25, cola_lm_head=True, norm="hybrid", gated_residual=True),
    "tied-mha": dict(tie_embeddings=True, n_kv_heads=4),
    "p0": dict(p=0.0),
}


@pytest.fixture(scope="module")
def files(train_overfit, tmp_path_factory):
    """export(type, options name, arch) -> path of the overfit model with those options, exported."""
    folder = tmp_path_factory.mktemp("ggml")
    checkpoints, made = {}, {}

    def export(type_: str, options: str = "default", arch: str = names.ARCH) -> Path:
        if options not in checkpoints:
            model, tokenizer, _ = train_overfit(**OPTIONS.get(options, {}))
            checkpoints[options] = save_checkpoint(folder / options, model, tokenizer)
        key = (type_, options, arch)
        if key not in made:
            made[key] = export_gguf(checkpoints[options], folder / f"{options}-{arch}-{type_}.gguf", type=type_,
                                    arch=arch)
        return made[key]

    return export


def prompt(backend, n: int = 24) -> torch.Tensor:
    """Two windows (2, n) of the text the model was overfit on: peaked distributions."""
    ids = backend.tokenizer.encode(TEXT).ids
    return torch.tensor([ids[:n], ids[3:n + 3]])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


# --- Logits against the torch engine ------------------------------------------------------

@pytest.mark.parametrize("type_", list(TOLERANCE))
def test_logits_match_the_torch_engine(type_, files):
    path = files(type_)
    ggml, reference = load_backend(path, engine="ggml"), load_backend(path, engine="torch")
    assert (ggml.engine, reference.engine) == ("ggml", "torch")
    ids = prompt(reference)
    got, expected = ggml.score(ids), reference.score(ids)
    error = relative_error(got, expected)
    log.warning("ggml vs torch engine, %s: max relative logit difference %.2g", type_, error)
    assert error < TOLERANCE[type_]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("type_", ["q8_0", "q5_1", "q4_0"])
def test_both_engines_are_near_the_files_exact_math(type_, files, rewrite, tmp_path):
    """Against the file's weights dequantized to f32 (the exact math of the file) both
    engines are off by their activation rounding only: ggml's 8-bit blocks (as llama.cpp)
    and the torch engine's bf16, measured 1.1e-2 and 5.3e-3 for q8_0, 6.5e-3 and 5.9e-3 for
    q4_0. So the difference between the engines is rounding on both sides, not a wrong
    weight, which would be off by tens of percent. (For float files the torch engine keeps
    fp32 activations and is the exact math.)"""
    from gguf import GGMLQuantizationType, quants

    path = files(type_)
    exact_file = rewrite(path, tmp_path / "exact.gguf", tensor_edit=lambda n, d, t: (
        n, quants.dequantize(d, t).astype(np.float32), GGMLQuantizationType.F32))
    exact = load_backend(exact_file, engine="torch")
    ids = prompt(exact)
    expected = exact.score(ids)
    ggml = relative_error(load_backend(path, engine="ggml").score(ids), expected)
    torch_engine = relative_error(load_backend(path, engine="torch").score(ids), expected)
    log.warning("%s against its exact math: ggml %.2g, torch engine %.2g", type_, ggml, torch_engine)
    assert ggml < TOLERANCE[type_] and torch_engine < TOLERANCE[type_]


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("type_", ["f32", "q8_0", "q4_0"])
def test_every_architecture_option(options, type_, files):
    path = files(type_, options)
    ggml, reference = load_backend(path, engine="ggml"), load_backend(path, engine="torch")
    ids = prompt(reference)
    assert relative_error(ggml.score(ids), reference.score(ids)) < TOLERANCE[type_]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("type_", ["f32", "f16", "q4_0"])
def test_llama_file_runs_its_interleaved_rows(tied, type_, train_overfit, tmp_path):
    """A llama file keeps llama.cpp's interleaved Q/K rows; ggml's interleaved RoPE on them
    equals the torch engine's un-permuted rows with rotate-half RoPE."""
    model, tokenizer, _ = train_overfit(p=0.0, tie_embeddings=tied)
    checkpoint = save_checkpoint(tmp_path / "llama", model, tokenizer)
    path = export_gguf(checkpoint, tmp_path / "llama.gguf", type=type_, arch=names.LLAMA_ARCH)
    ggml, reference = load_backend(path, engine="ggml"), load_backend(path, engine="torch")
    ids = prompt(reference)
    assert relative_error(ggml.score(ids), reference.score(ids)) < TOLERANCE[type_]


# --- Decoding ---------------------------------------------------------------------------

def greedy(backend, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens after a batch-1 prompt, one decode call per token."""
    cache = backend.new_cache(1)
    mask = torch.ones_like(ids)
    token = backend.prefill(cache, ids, mask, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out = [int(token)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        token = backend.decode(cache, token, mask)[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
    return out


@pytest.mark.parametrize("type_", ["f32", "f16", "q8_0"])
def test_greedy_tokens_equal_the_torch_engines_over_64_steps(type_, files):
    path = files(type_)
    ggml, reference = load_backend(path, engine="ggml"), load_backend(path, engine="torch")
    ids = prompt(reference, 20)[:1]
    expected = greedy(reference, ids, 64)
    assert len(set(expected)) > 8  # the overfit model continues its text, it does not repeat one token
    assert greedy(ggml, ids, 64) == expected


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("type_, tolerance", [("f32", 1e-5), ("f16", 1e-3), ("q4_0", 1e-3)])
def test_cached_decode_equals_the_uncached_forward(type_, tolerance, kv, files):
    """Prefill, a 4-token step and single-token steps over the cache give the logits of
    one uncached forward over all the tokens, with either cache type (the uncached
    forward writes its keys through a cache of the same type)."""
    import ggml as G

    from fanformer.runtime.ggml_engine import GGMLEngine

    backend = load_backend(files(type_), engine="ggml")
    reader = backend.ggml.reader
    backend.ggml = GGMLEngine(reader, {t.name: t for t in reader.tensors}, backend.config, 1,
                              kv_type=G.GGML_TYPE_F16 if kv == "f16" else G.GGML_TYPE_F32)
    ids = prompt(backend, 20)
    expected = backend.score(ids)
    cache = backend.new_cache(2)
    mask = lambda n: torch.ones((2, n), dtype=torch.long)  # noqa: E731
    got = [backend.prefill(cache, ids[:, :8], mask(8)), backend.forward(ids[:, 8:12], mask(12), cache)]
    got += [backend.decode(cache, ids[:, t:t + 1], mask(t + 1)) for t in range(12, 20)]
    assert relative_error(torch.cat(got, dim=1), expected) < tolerance
    assert relative_error(backend.prefill(backend.new_cache(2), ids, mask(20), last_only=True), expected[:, -1:]) \
        < tolerance


@pytest.mark.parametrize("type_", ["f32", "q8_0"])
def test_left_padded_batch_equals_each_sequence_alone(type_, files):
    backend = load_backend(files(type_), engine="ggml")
    ids = prompt(backend, 20)
    short, long = ids[0, :12], ids[1]
    pad = backend.info.pad_id
    batch = torch.stack([torch.cat([torch.full((8,), pad), short]), long])  # (2, 20), row 0 left-padded
    mask = torch.ones_like(batch)
    mask[0, :8] = 0
    cache = backend.new_cache(2)
    got = backend.prefill(cache, batch, mask)
    tokens = [backend.decode(cache, t[:, None], torch.cat([mask, torch.ones((2, k + 1), dtype=torch.long)], 1))
              for k, t in enumerate(ids[:, 15:18].T)]
    alone = [backend.score(short[None]), backend.score(long[None])]
    bound = 1e-5 if type_ == "f32" else 1e-3
    assert relative_error(got[0, 8:], alone[0][0]) < bound and relative_error(got[1], alone[1][0]) < bound
    for row, sequence in enumerate((short, long)):
        cache = backend.new_cache(1)
        backend.prefill(cache, sequence[None], torch.ones((1, len(sequence)), dtype=torch.long))
        for k, t in enumerate(ids[row, 15:18]):
            expected = backend.decode(cache, t.view(1, 1), torch.ones((1, len(sequence) + k + 1), dtype=torch.long))
            assert relative_error(tokens[k][row], expected[0]) < bound


# --- Engine mechanics -------------------------------------------------------------------

def test_kv_cache_type_follows_the_file_and_the_head_width(files):
    import ggml as G

    from fanformer.runtime.ggml_engine import default_kv_type

    tensors = {t.name: t for t in GGUFReader(files("q8_0")).tensors}
    config = load_backend(files("q8_0"), engine="ggml").config
    assert default_kv_type(config.replace(head_dim=64), tensors) == G.GGML_TYPE_F16  # llama.cpp's default
    assert default_kv_type(config.replace(head_dim=32), tensors) == G.GGML_TYPE_F32  # narrow heads
    f32 = {t.name: t for t in GGUFReader(files("f32")).tensors}
    assert default_kv_type(config.replace(head_dim=64), f32) == G.GGML_TYPE_F32  # fp32 throughout


def test_step_inputs_are_the_models_masks_and_positions():
    from fanformer.runtime.ggml_engine import step_inputs

    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    past, T, n_kv, n_ctx = 4, 2, 8, 16
    positions, rows, bias = step_inputs(mask.numpy(), past, 2, T, n_kv, n_ctx)
    assert positions.tolist() == [2, 3, 4, 5]  # real tokens before each one (model.py's position_ids)
    assert rows.tolist() == [4, 5, 16 + 4, 16 + 5]  # sequence b's rows start at b * n_ctx
    allowed = attention_bias(mask, past, T, 2, torch.device("cpu"))[:, 0]  # (B, T, S)
    assert torch.equal(torch.from_numpy(bias[..., :past + T] == 0), allowed)
    assert np.isneginf(bias[..., past + T:]).all()  # positions not yet written


def test_graphs_and_caches_are_reused(files):
    backend = load_backend(files("f32"), engine="ggml")
    ids = prompt(backend)[:1]
    cache = backend.new_cache(1)
    store = cache.store
    greedy(backend, ids, 6)  # its own cache
    backend.prefill(cache, ids, torch.ones_like(ids))
    for t in range(3):
        backend.decode(cache, ids[:, :1], torch.ones((1, ids.shape[1] + t + 1), dtype=torch.long))
    assert len(store.graphs) == 2  # one prefill graph, one decode graph for every step
    del cache
    assert backend.new_cache(1).store is store  # the store of a dropped cache, graphs and all
    stale = backend.new_cache(1)
    stale.store.owner = lambda: None  # as if a newer cache had taken the store
    with pytest.raises(FANformerError, match="went to a newer cache"):
        backend.decode(stale, ids[:, :1], torch.ones((1, 1), dtype=torch.long))


def test_full_context_is_refused(files):
    backend = load_backend(files("f32"), engine="ggml")
    n = backend.info.max_seq_len
    cache = backend.new_cache(1)
    backend.prefill(cache, torch.zeros((1, n), dtype=torch.long), torch.ones((1, n), dtype=torch.long))
    with pytest.raises(FANformerError, match="the context is full"):
        backend.decode(cache, torch.zeros((1, 1), dtype=torch.long), torch.ones((1, n + 1), dtype=torch.long))


def test_token_ids_outside_the_vocabulary_are_refused(files):
    backend = load_backend(files("f32"), engine="ggml")
    vocab = backend.info.vocab_size
    with pytest.raises(FANformerError, match=f"token ids must lie in \\[0, {vocab}\\)"):
        backend.score(torch.tensor([[1, vocab]]))


def test_threads_are_honoured_and_change_nothing(files):
    path = files("q4_0")
    one, two = load_backend(path, engine="ggml", threads=1), load_backend(path, engine="ggml", threads=2)
    assert (one.ggml.threads, two.ggml.threads) == (1, 2)
    ids = prompt(one)
    torch.testing.assert_close(two.score(ids), one.score(ids), rtol=0, atol=1e-5)
    with pytest.raises(FANformerError, match="--threads must be at least 1"):
        load_backend(path, engine="ggml", threads=0)


@pytest.mark.parametrize("type_", ["f16", "q8_0", "q4_0"])
def test_weights_stay_in_the_file(type_, files):
    """Every tensor is a view of the memory-mapped file, in its own type, except the Q4_0
    matrices ggml repacks (as llama.cpp does): those are copied once, still Q4_0."""
    import ggml as G

    path = files(type_)
    backend = load_backend(path, engine="ggml")
    reader = backend.ggml.reader
    start, stop = reader.data.ctypes.data, reader.data.ctypes.data + reader.data.nbytes
    stored = {t.name: t for t in GGUFReader(path).tensors}
    for name, tensor in backend.ggml.model.weights.items():
        assert tensor.contents.type == int(stored[name].tensor_type)
        inside = start <= G.ggml_get_data(tensor) < stop
        assert inside or (type_ == "q4_0" and name != "token_embd.weight"), name
    assert backend.weight_bytes() == sum(int(t.n_bytes) for t in stored.values())
