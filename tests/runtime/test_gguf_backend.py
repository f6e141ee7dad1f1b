"""Tests for runtime/gguf_backend.py: the block layouts against gguf-py's own
dequantization, the 4-bit kernel planes, the 16-bit kernels and the shared-input layer
against plain fp32 matmuls, a GGUF file against the checkpoint it came from (f32
exactly, f16 / q8_0 within measured drift, llama-arch un-permuted), the embedded
tokenizer, weights held quantized, and one clear error per kind of bad file."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, quants

from fanformer.export import gguf_format as names
from fanformer.export.gguf_export import export_gguf
from fanformer.checkpoint import load_model, save_checkpoint
from fanformer.cli import main
from fanformer.errors import FANformerError
from fanformer.tokenizer import load_tokenizer
from fanformer.runtime import drift, eval_tokens, generate, load_backend, reference_greedy
from fanformer.runtime.gguf_layers import (DEQUANTIZE, HAS_FBGEMM, HAS_ONEDNN_BF16, Bf16Linear, DenseLinear, Fp16Linear,
                                           Int4Linear, SharedInputLinear, dequantize, float_linear, int4_planes)
from fanformer.runtime.generation import GenerationConfig
from fanformer.runtime.gguf_backend import ggml_missing
from fanformer.runtime.torch_backend import TorchBackend

Q = GGMLQuantizationType
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def export_to(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    made = {}

    def export(type: str, arch: str = names.ARCH, source: Path = checkpoint) -> Path:
        key = (type, arch, source)
        if key not in made:
            made[key] = export_gguf(source, folder / f"{len(made)}-{arch}-{type}.gguf", type=type, arch=arch)
        return made[key]

    return export


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_backend(checkpoint)


@pytest.fixture(params=["ggml", "torch"])
def engine(request):
    """Each GGUF engine in turn (tests/runtime/test_ggml_engine.py compares the two directly)."""
    if request.param == "ggml" and ggml_missing() is not None:
        pytest.skip(f"ggml-python does not load: {ggml_missing()}")
    return request.param


def sample_ids(n: int = 24) -> torch.Tensor:
    return torch.randint(3, 300, (2, n), generator=torch.Generator().manual_seed(0))


# --- Block layouts ---------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(DEQUANTIZE), ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(qtype):
    weights = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    weights[0, :32] = 0.0  # an all-zero block (d = 0)
    raw = quants.quantize(weights, qtype)  # (rows, row bytes)
    expected = torch.from_numpy(quants.dequantize(raw, qtype))
    got = dequantize(torch.from_numpy(raw), qtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # The 4-bit planes the kernel runs sum to the same values (fp32 rounding of the zeros).
    blocks = torch.from_numpy(raw).unflatten(-1, (-1, raw.shape[-1] // 3))
    planes = int4_planes(blocks, qtype)
    assert all(int(q.min()) >= 0 and int(q.max()) <= 15 for q, _, _ in planes)
    rebuilt = sum((q.float() - 8) * scale + zero for q, scale, zero in planes).flatten(-2)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", list(DEQUANTIZE), ids=lambda t: t.name)
def test_int4_kernel_matches_dequantized_matmul(qtype):
    weights = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)  # 40 rows: padded to 48
    raw = torch.from_numpy(quants.quantize(weights, qtype))
    bias = torch.randn(40)
    linear = Int4Linear(raw.unflatten(-1, (2, -1)), qtype, bias)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, dequantize(raw, qtype), bias)
    # bf16 activations, scales and output (8-bit significands): error ~2^-8 of the output's scale.
    torch.testing.assert_close(linear(x), expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_int4_packing_in_row_chunks_equals_packing_at_once(monkeypatch):
    raw = torch.from_numpy(quants.quantize(np.random.default_rng(2).standard_normal((200, 64)).astype(np.float32),
                                           Q.Q8_0)).unflatten(-1, (2, -1))
    at_once = Int4Linear(raw, Q.Q8_0, None)
    monkeypatch.setattr(Int4Linear, "PACK_ROWS", 64)
    chunked = Int4Linear(raw, Q.Q8_0, None)
    assert torch.equal(chunked.packed, at_once.packed) and torch.equal(chunked.scales_zeros, at_once.scales_zeros)


# --- 16-bit kernels and the shared-input layer -------------------------------------

@pytest.mark.skipif(not HAS_FBGEMM, reason="fbgemm (x86 builds of torch) runs the fp16 kernel")
def test_f16_kernel_is_the_fp32_product_of_the_f16_weights():
    weight = (torch.randn(40, 64) / 8).half()
    bias = torch.randn(40)
    linear = float_linear(weight, bias)
    assert isinstance(linear, Fp16Linear)
    x = torch.randn(3, 5, 64)
    # fp32 activations and accumulation: only the order of summation differs.
    torch.testing.assert_close(linear(x), F.linear(x, weight.float(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_FBGEMM, reason="fbgemm (x86 builds of torch) runs the fp16 kernel")
def test_bf16_weights_run_as_fp16_within_its_subnormal_step():
    weight = (torch.randn(40, 64) / 8).bfloat16()
    # 65280: the largest bf16 in fp16's range (65504 is not a bf16).
    weight[0, :8] = torch.tensor([3e-9, -1e-7, 2 ** -17, 2 ** -20 * 1.5, 6e-5, -65280.0, 1e-38, 0.0])
    as_fp16 = weight.to(torch.float16).float()
    big = weight.float().abs() >= 2 ** -17
    assert torch.equal(as_fp16[big], weight.float()[big])  # exact from 2^-17 up
    assert float((as_fp16 - weight.float()).abs().max()) <= 2 ** -25  # below it, fp16's subnormal step
    linear = float_linear(weight, None)
    assert isinstance(linear, Fp16Linear)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(linear(x), F.linear(x, weight.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (HAS_FBGEMM and HAS_ONEDNN_BF16), reason="needs fbgemm and oneDNN bf16 (x86 torch)")
def test_bf16_weights_beyond_fp16_range_stay_bf16():
    weight = (torch.randn(40, 64) / 8).bfloat16()
    weight[3, 5] = 1e5  # no fp16 for this: the tensor keeps bf16 on oneDNN
    bias = torch.randn(40)
    linear = float_linear(weight, bias)
    assert isinstance(linear, Bf16Linear)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x.bfloat16().float(), weight.float())  # bf16 activations
    # The product is rounded to bf16 (8-bit significand), then the fp32 bias is added.
    torch.testing.assert_close(linear(x) - bias, expected, rtol=2 ** -8, atol=1e-5)


def test_shared_input_members_agree_with_separate_layers_in_any_call_order():
    weights = [torch.randn(n, 16) for n in (8, 4, 4)]
    shared = SharedInputLinear(DenseLinear(torch.cat(weights), None), [8, 4, 4])
    q, k, v = shared.members
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    calls = [(q, x), (k, x), (v, x),  # the model's order: one joint matmul
             (k, y), (q, y), (v, y),  # a new input reaching a later member first
             (q, x), (q, y), (k, y),  # a member called twice
             (v, x), (v, x)]  # the last member with no first member before it
    for member, inp in calls:
        i = shared.members.index(member)
        torch.testing.assert_close(member(inp), F.linear(inp, weights[i]), rtol=0, atol=0)


@pytest.mark.parametrize("type_", ["f16", "bf16"])
def test_float_types_read_as_stored(type_, export_to):
    reader = GGUFReader(export_to(type_))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    got = dequantize(torch.from_numpy(np.array(tensor.data)), tensor.tensor_type)
    expected = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type))
    torch.testing.assert_close(got, expected.reshape(got.shape), rtol=0, atol=0)


# --- Against the checkpoint ---------------------------------------------------------

def test_f32_file_reproduces_checkpoint_logits(export_to, reference, engine):
    backend = load_backend(export_to("f32"), engine=engine)
    assert backend.info.format == "gguf" and backend.info.dtype == "fp32 (f32 weights)"
    assert (backend.config, backend.info.vocab_size) == (reference.model.config, reference.info.vocab_size)
    assert (backend.info.bos_id, backend.info.eos_id, backend.info.pad_id) == (0, 1, 2)
    ids = sample_ids()
    torch.testing.assert_close(backend.score(ids), reference.score(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(norm="hybrid", gated_residual=True, fan_activation="gelu"),
    dict(cola_rank=0.25, cola_lm_head=True, norm="hybrid"),
    dict(tie_embeddings=True, n_kv_heads=4),
], ids=["hybrid-gates-gelu", "cola", "tied"])
def test_every_architecture_option_round_trips(overrides, make_model, tokenizer, tmp_path, export_to, engine):
    source = save_checkpoint(tmp_path / "ckpt", make_model(seed=1, **overrides), tokenizer)
    expected = TorchBackend.from_model(load_model(source)).score(sample_ids())
    got = load_backend(export_to("f32", source=source), engine=engine).score(sample_ids())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Quantized, the same model runs through the 4-bit kernel (CoLA factors, tied head and all).
    got = load_backend(export_to("q8_0", source=source), engine=engine).score(sample_ids())
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("tied", [False, True])
def test_llama_file_loads_back_to_checkpoint_logits(tied, make_model, tokenizer, tmp_path, export_to, engine):
    source = save_checkpoint(tmp_path / "llama", make_model(seed=2, p=0.0, tie_embeddings=tied), tokenizer)
    path = export_to("f32", arch=names.LLAMA_ARCH, source=source)
    assert ("output.weight" in {t.name for t in GGUFReader(path).tensors}) != tied
    backend = load_backend(path, engine=engine)
    assert backend.config == load_model(source).config
    expected = TorchBackend.from_model(load_model(source)).score(sample_ids())
    torch.testing.assert_close(backend.score(sample_ids()), expected, rtol=1e-5, atol=1e-5)
    quantized = load_backend(export_to("q8_0", arch=names.LLAMA_ARCH, source=source), engine=engine)
    quantized = quantized.score(sample_ids())
    assert (quantized.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8  # rows un-permuted as stored


@pytest.mark.parametrize("type_, kl_bound, top1_bound", [("f16", 1e-5, 0.99), ("q8_0", 2e-3, 0.9)])
def test_drift_of_16_and_8_bit_files(type_, kl_bound, top1_bound, export_to, checkpoint, corpus, engine):
    backend = load_backend(export_to(type_), engine=engine)
    tokens = eval_tokens(backend.tokenizer, [str(corpus)], "all", 1500)
    result = drift(backend, load_backend(checkpoint), tokens, ctx=64, batch_size=8)
    log.warning("gguf %s (%s engine) vs fp32 checkpoint: KL %.3g (p99 %.3g), top-1 %.4f, ppl change %+.3g%%",
                type_, engine, result.kl_mean, result.kl_p99, result.top1_agreement, 100 * result.ppl_change)
    assert result.kl_mean < kl_bound and result.top1_agreement > top1_bound


@pytest.mark.parametrize("type_, kl_bound", [("bf16", 1e-4), ("q5_1", 3e-2), ("q5_0", 3e-2), ("q4_1", 0.1),
                                             ("q4_0", 0.1)])
def test_every_weight_type_tracks_the_checkpoint(type_, kl_bound, export_to, reference, engine):
    ids = sample_ids(32)
    expected = torch.log_softmax(reference.score(ids), -1)
    got = torch.log_softmax(load_backend(export_to(type_), engine=engine).score(ids), -1)
    kl = float((expected.exp() * (expected - got)).sum(-1).mean())
    log.warning("gguf %s (%s engine) vs fp32 checkpoint on random tokens: KL %.3g", type_, engine, kl)
    assert kl < kl_bound


def test_cached_decode_equals_uncached_score(export_to):
    backend = load_backend(export_to("q8_0"), engine="torch")  # ggml: tests/runtime/test_ggml_engine.py
    ids = sample_ids(20)
    expected = backend.score(ids)
    cache = backend.new_cache(2)
    mask = lambda n: torch.ones((2, n), dtype=torch.long)  # noqa: E731
    got = [backend.prefill(cache, ids[:, :8], mask(8)), backend.forward(ids[:, 8:12], mask(12), cache)]
    got += [backend.decode(cache, ids[:, t:t + 1], mask(t + 1)) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_pytorch_reference(export_to, reference, engine):
    backend = load_backend(export_to("f32"), engine=engine)
    prompt = "def add(a, b):"
    got = generate(backend, [prompt], GenerationConfig(max_new_tokens=16, temperature=0))[0]
    assert got.token_ids == reference_greedy(reference, reference.tokenizer.encode(prompt).ids, 16)


def test_cli_generate_and_eval_run_the_file(capsys, export_to, checkpoint, corpus):
    path = str(export_to("f32"))
    assert main(["generate", path, "--prompt", "def ", "--greedy", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    expected = generate(load_backend(checkpoint), ["def "], GenerationConfig(max_new_tokens=8, temperature=0))
    assert capsys.readouterr().out == "def " + expected[0].text + "\n"
    assert main(["eval", path, "--data", str(corpus), "--split", "all", "--ctx", "64", "--max-tokens", "800",
                 "--quiet", "--json", "--reference", str(checkpoint), "--device", "cpu"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["model_info"]["format"] == "gguf" and reported["top1_agreement"] > 0.99


def test_cli_engine_and_threads_flags(capsys, export_to, checkpoint, cli_fails):
    path = str(export_to("q8_0"))
    outputs = []
    for engine in ("torch", "ggml") if ggml_missing() is None else ("torch",):
        assert main(["generate", path, "--prompt", "def ", "--greedy", "--max-new-tokens", "4", "--engine", engine,
                     "--threads", "1"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("def ")
    cli_fails(["generate", str(checkpoint), "--prompt", "x", "--engine", "ggml"], "--engine applies to GGUF files")
    cli_fails(["generate", str(checkpoint), "--prompt", "x", "--threads", "1"], "--threads applies to GGUF files and ONNX")


def test_without_ggml_the_torch_engine_runs_with_one_warning(export_to, monkeypatch, caplog):
    from fanformer.runtime import gguf_backend

    monkeypatch.setattr(gguf_backend, "ggml_missing", lambda: "OSError: libggml.so: cannot open shared object file")
    gguf_backend._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        backends = [load_backend(export_to("f32")) for _ in range(2)]
    assert [b.engine for b in backends] == ["torch", "torch"]
    assert len([r for r in caplog.records if "ggml-python does not load" in r.message]) == 1
    with pytest.raises(FANformerError, match="--engine ggml needs ggml-python"):
        load_backend(export_to("f32"), engine="ggml")
    gguf_backend._warn_fallback.cache_clear()


# --- Tokenizer and memory --------------------------------------------------------------

def test_embedded_tokenizer_matches_tokenizer_json(export_to, checkpoint):
    original, rebuilt = load_tokenizer(checkpoint), load_backend(export_to("q4_0")).tokenizer
    texts = ["def add(a, b):\n    return a + b\n", "période π ≈ 3.14 🙂 — naïve café", "日本語のテキスト",
             "<|bos|>x<|eos|><|pad|>", "  leading  spaces\t\ttabs\r\n", "", "🙂🙃" * 5, "\x00\x7f bytes"]
    for text in texts:
        assert rebuilt.encode(text).ids == original.encode(text).ids, text
        assert rebuilt.decode(original.encode(text).ids) == original.decode(original.encode(text).ids)
    assert rebuilt.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)


@pytest.mark.parametrize("type_, bound", [("q8_0", 0.4), ("q4_0", 0.4), ("f16", 0.55)])
def test_weights_stay_in_the_file_type(type_, bound, export_to, reference):
    backend = load_backend(export_to(type_), engine="torch")  # ggml: tests/runtime/test_ggml_engine.py
    fp32_bytes = sum(p.numel() * 4 for p in reference.model.parameters())
    ratio = backend.weight_bytes() / fp32_bytes
    log.warning("gguf %s holds %.3f x the fp32 weight bytes", type_, ratio)
    assert ratio < bound
    held = list(backend.module.parameters()) + list(backend.module.buffers())
    assert not [t.shape for t in held if t.dtype == torch.float32 and t.dim() > 1]  # no fp32 matrix anywhere


# --- Bad files -------------------------------------------------------------------------

def test_rewrite_helper_keeps_a_good_file_good(export_to, tmp_path, reference, rewrite):
    path = rewrite(export_to("f32"), tmp_path / "copy.gguf")
    torch.testing.assert_close(load_backend(path).score(sample_ids()), reference.score(sample_ids()),
                               rtol=1e-5, atol=1e-5)


def _bytes(source: Path, out: Path, edit) -> Path:
    out.write_bytes(edit(source.read_bytes()))
    return out


@pytest.mark.parametrize("case, expected", [
    ("truncated", "truncated"),
    ("tiny", "too short"),
    ("magic", "not a GGUF file"),
    ("version", "version 99"),
    ("arch", "'gpt2' model"),
    ("missing key", names.HEAD_COUNT.format(arch=names.ARCH)),
    ("wrong shape", "blk.0.attn_q.weight has shape"),
    ("wrong type", "blk.0.attn_norm.weight is Q8_0"),
    ("unsupported type", "blk.0.attn_k.weight is I32"),
    ("unknown tensor", "blk.0.mystery.weight"),
    ("missing tensor", "lacks tensors"),
])
def test_bad_files_raise_one_clear_error(case, expected, export_to, tmp_path, rewrite):
    good = export_to("f32")
    out = tmp_path / "bad.gguf"
    shape_edit = lambda n, d, t: (n, d[:-16], t) if n == "blk.0.attn_q.weight" else (n, d, t)  # noqa: E731
    make = {
        "truncated": lambda: _bytes(good, out, lambda b: b[:len(b) - 1000]),
        "tiny": lambda: _bytes(good, out, lambda b: b[:5]),
        "magic": lambda: _bytes(good, out, lambda b: b"GGML" + b[4:]),
        "version": lambda: _bytes(good, out, lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:]),
        "arch": lambda: rewrite(good, out, arch="gpt2"),
        "missing key": lambda: rewrite(good, out, drop_key=names.HEAD_COUNT.format(arch=names.ARCH)),
        "wrong shape": lambda: rewrite(good, out, tensor_edit=shape_edit),
        "wrong type": lambda: rewrite(good, out, tensor_edit=lambda n, d, t: (
            (n, np.zeros((1, 34 * d.size // 32), np.uint8), Q.Q8_0) if n == "blk.0.attn_norm.weight" else (n, d, t))),
        "unsupported type": lambda: rewrite(good, out, tensor_edit=lambda n, d, t: (
            (n, d.view(np.int32), Q.I32) if n == "blk.0.attn_k.weight" else (n, d, t))),
        "unknown tensor": lambda: rewrite(good, out, tensor_edit=lambda n, d, t: (
            ("blk.0.mystery.weight", d, t) if n == "blk.0.ffn_up.weight" else (n, d, t))),
        "missing tensor": lambda: rewrite(good, out, tensor_edit=lambda n, d, t: (
            None if n == "blk.1.ffn_down.weight" else (n, d, t))),
    }
    path = make[case]()
    with pytest.raises(FANformerError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load_backend(path)


def test_magic_alone_is_detected(export_to, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(export_to("f32").read_bytes())
    assert load_backend(path).info.format == "gguf"
