"""K-quant and i-quant GGUF files (quant/kquants.py) and importance matrices
(quant/imatrix.py, export/gguf_imatrix.py), against independent references: llama.cpp's
own `llama_model_quantize` on the same f32 file (byte for byte, where llama-cpp-python is
installed), gguf-py's dequantizers, the GGUF backend's two engines against each other, and
the importance statistics recomputed by hand."""

import ctypes
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from fanformer.checkpoint import save_checkpoint
from fanformer.config import FANformerConfig
from fanformer.export import gguf_format as names
from fanformer.quant import kquants
from fanformer.export.gguf_export import export_gguf
from fanformer.export.gguf_imatrix import gguf_entries, read_imatrix, write_imatrix
from fanformer.model import FANformer
from fanformer.quant.calibration import calibration_tokens
from fanformer.quant.imatrix import collect_importance
from fanformer.runtime import load_backend
from fanformer.tokenizer import train_tokenizer

T = GGMLQuantizationType
MIXTURES = list(kquants.MIXTURES)
# Rows of 256 and 512 (whole K-quant super-blocks), 8 layers so that the _M mixtures'
# layer choice (use_more_bits) and the Q3_K_M / Q4_K_S first-layers rules all show.
WIDE = dict(vocab_size=512, d_model=256, n_layers=8, n_heads=4, n_kv_heads=1, head_dim=64, ffn_dim=512,
            max_seq_len=64)
# Relative RMS error of a Gaussian weight's round trip, a little above what each base type
# measures (q2_k 0.29 ... q6_k 0.018): bits per weight decide it.
RMS_BOUND = {T.Q2_K: 0.36, T.Q3_K: 0.19, T.Q4_K: 0.10, T.Q5_K: 0.05, T.Q6_K: 0.025, T.IQ4_NL: 0.10,
             T.IQ4_XS: 0.10, T.Q8_0: 0.005, T.Q5_0: 0.06, T.Q5_1: 0.05, T.Q4_0: 0.12, T.Q4_1: 0.10}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, 400)


def checkpoint(tmp_path_factory, tokenizer, name: str, **options) -> Path:
    torch.manual_seed(0)
    model = FANformer(FANformerConfig(**{**WIDE, **options}))
    with torch.no_grad():  # non-trivial norms, as a trained model has
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return save_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", model, tokenizer)


@pytest.fixture(scope="module")
def fan(tmp_path_factory, tokenizer) -> Path:
    """Every FANformer option whose tensors have K-quant-sized rows."""
    return checkpoint(tmp_path_factory, tokenizer, "fan", p=0.25, norm="hybrid", gated_residual=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer) -> Path:
    return checkpoint(tmp_path_factory, tokenizer, "llama", p=0.0)


def file_tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


# --- llama.cpp's bytes -----------------------------------------------------------------

def llama_cpp_tool(name: str) -> str | None:
    """A llama.cpp program (llama-quantize, ...) on PATH or in $LLAMA_CPP_BIN, or None."""
    return shutil.which(name, path=os.pathsep.join(filter(None, (os.environ.get("LLAMA_CPP_BIN"),
                                                                   os.environ.get("PATH")))))


def llama_quantize(f32: Path, out: Path, kind: str, pure: bool = False, imatrix: Path | None = None,
                   **flags) -> Path:
    """llama.cpp's quantization of `f32` into `out`: its llama-quantize program where installed,
    else llama-cpp-python's llama_model_quantize (no importance matrix there: it takes the
    matrix as a C++ map), else the test is skipped."""
    if (program := llama_cpp_tool("llama-quantize")) is not None:
        argv = [program, *(["--pure"] if pure else []), *(["--imatrix", str(imatrix)] if imatrix else [])]
        for flag, value in flags.items():
            argv += [f"--{flag.replace('_', '-')}", value]
        run = subprocess.run([*argv, str(f32), str(out), kind.upper(), "1"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return out
    if imatrix is not None:
        pytest.skip("llama.cpp's llama-quantize is not installed (on PATH or in $LLAMA_CPP_BIN)")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp runs through llama-quantize or llama-cpp-python")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(names.WEIGHT_TYPES[kind][1])
    params.nthread = 1
    params.pure = pure
    for flag, value in flags.items():
        setattr(params, flag, int(GGMLQuantizationType[value.upper()]))
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    """Every tensor of the two files: the same names, types and bytes."""
    a, b = file_tensors(ours), file_tensors(theirs)
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


@pytest.mark.parametrize("kind,pure", [(kind, False) for kind in MIXTURES + list(names.LEGACY_TYPES)]
                         + [("q4_0", True), ("q4_k_m", True)])
def test_every_mixture_is_llama_cpps_own_bytes(llama, kind, pure, tmp_path):
    """llama.cpp quantizes our f32 `llama` file to the same mixture (the legacy types with the
    LM head in Q6_K, q8_0 all Q8_0; `pure` one type everywhere, llama-quantize --pure): every
    tensor, its type and its bytes, equal to our direct export."""
    f32 = export_gguf(llama, tmp_path / "f32.gguf", type="f32", arch="llama")
    ours = export_gguf(llama, tmp_path / "ours.gguf", type=kind, arch="llama", pure=pure)
    assert_same_tensors(ours, llama_quantize(f32, tmp_path / "theirs.gguf", kind, pure))


@pytest.mark.parametrize("kind", ["q4_k_m", "q3_k_m", "iq4_xs", "q4_0"])
def test_llama_quantize_with_our_imatrix_writes_our_bytes(llama, corpus, kind, tmp_path):
    """`llama-quantize --imatrix` given our importance matrix file writes, from our f32 file,
    the very bytes our export writes with it: the file is llama.cpp's format, and the same
    matrix weighs the same rounding (the legacy q4_0 with llama.cpp's first-ffn_down guard)."""
    from fanformer.export.gguf_imatrix import make_imatrix

    imatrix, _, _ = make_imatrix(llama, tmp_path / "m.imatrix.gguf", [str(corpus)], chunks=4, ctx=64,
                                 progress=False)
    f32 = export_gguf(llama, tmp_path / "f32.gguf", type="f32", arch="llama")
    ours = export_gguf(llama, tmp_path / "ours.gguf", type=kind, arch="llama", imatrix=imatrix)
    assert_same_tensors(ours, llama_quantize(f32, tmp_path / "theirs.gguf", kind, imatrix=imatrix))


# --- Types, values, fallbacks --------------------------------------------------------------

def test_mixture_rules_on_a_known_model():
    """Q4_K_M's more-bits layers for 32 layers, as llama.cpp's quantize log of a 32-layer
    Llama lists them (attn_v and ffn_down at Q6_K), and the output at Q6_K."""
    q6 = [i for i in range(32) if kquants.mixture_type(f"blk.{i}.ffn_down.weight", "q4_k_m", 32, 1,
                                                            False, False) == T.Q6_K]
    assert q6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert kquants.mixture_type("output.weight", "q4_k_m", 32, 1, False, False) == T.Q6_K
    assert kquants.mixture_type("blk.5.fan.weight", "q4_k_m", 32, 1, False, False) == T.Q4_K  # ours: base
    assert kquants.mixture_type("blk.0.attn_v.weight", "q3_k_m", 32, 4, False, False) == T.Q5_K
    assert kquants.mixture_type("blk.0.ffn_down.weight", "q4_0", 32, 1, False, True) == T.Q4_1  # imatrix guard
    assert kquants.mixture_type("blk.0.ffn_down.weight", "q4_0", 32, 1, False, False) == T.Q4_0
    # The LM head: Q6_K for the legacy types too, but q8_0 keeps Q8_0; a tied embedding is the head.
    assert kquants.mixture_type("output.weight", "q4_0", 32, 1, False, False) == T.Q6_K
    assert kquants.mixture_type("output.weight", "q8_0", 32, 1, False, False) == T.Q8_0
    assert kquants.mixture_type("token_embd.weight", "q5_1", 32, 1, True, False) == T.Q6_K
    assert kquants.mixture_type("token_embd.weight", "q5_1", 32, 1, False, False) == T.Q5_1
    for kind in ("q4_0", "q4_k_m"):  # --pure: the base type everywhere
        assert {kquants.mixture_type(name, kind, 32, 1, False, True, pure=True) for name in
                ("output.weight", "blk.0.ffn_down.weight", "blk.0.attn_v.weight")} == {names.WEIGHT_TYPES[kind][0]}


@pytest.mark.parametrize("kind", MIXTURES)
def test_every_tensor_dequantizes_close_to_the_checkpoint(fan, kind, tmp_path):
    """gguf-py's dequantizer reads back every 2-D tensor within its type's error, each in the
    type the mixture names; 1-D tensors stay F32 and exact."""
    path = export_gguf(fan, tmp_path / "m.gguf", type=kind)
    model = load_backend(fan, format="pytorch").model
    config = model.config
    state = {names.gguf_tensor_name(k): v.float().numpy() for k, v in model.state_dict().items()
             if k != "lm_head.weight" or not config.tie_embeddings}
    found = file_tensors(path)
    assert set(found) == set(state)
    seen = set()
    for name, array in state.items():
        t = found[name]
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(array.shape)
        if array.ndim == 1:
            assert t.tensor_type == T.F32 and np.array_equal(got, array), name
            continue
        wanted = kquants.mixture_type(name, kind, config.n_layers, config.n_heads // config.n_kv_heads,
                                           config.tie_embeddings, False)
        assert t.tensor_type == kquants.fallback_type(wanted, array.shape[-1]), name
        seen.add(t.tensor_type)
        rms = np.sqrt(np.mean((got - array) ** 2) / np.mean(array ** 2))
        assert rms <= RMS_BOUND[t.tensor_type], (name, t.tensor_type.name, rms)
    assert kquants.MIXTURES[kind].base in seen


def test_rows_not_in_whole_super_blocks_fall_back_as_llama_cpp_does(tmp_path_factory, tokenizer, caplog):
    """Rows of 64 (the tiny widths) take Q5_0 for Q4_K, Q8_0 for Q6_K, IQ4_NL for IQ4_XS, and
    the export says which tensors."""
    path = checkpoint(tmp_path_factory, tokenizer, "narrow", d_model=64, ffn_dim=512, head_dim=16, n_layers=2)
    expected = {"q4_k_m": T.Q5_0, "q6_k": T.Q8_0, "iq4_xs": T.IQ4_NL}
    for kind, fallback in expected.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fanformer.export.gguf_export"):
            out = export_gguf(path, path.with_name(f"{kind}.gguf"), type=kind)
        found = file_tensors(out)
        assert found["blk.0.attn_q.weight"].tensor_type == fallback  # rows of 64
        assert found["blk.1.ffn_down.weight"].tensor_type != fallback  # rows of 512 keep a K-quant
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert f"blk.0.attn_q.weight ({kquants.MIXTURES[kind].base.name.lower()} -> {fallback.name.lower()})" \
            in warning


@pytest.mark.parametrize("kind", ["q4_k_m", "q6_k", "iq4_xs", "q2_k"])
def test_both_gguf_engines_run_every_type_alike(fan, kind, tmp_path):
    """The ggml engine (ggml's own kernels on the blocks) and the torch engine (gguf-py's
    dequantization at load) compute the same logits, near the float model's."""
    path = export_gguf(fan, tmp_path / "m.gguf", type=kind)
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = load_backend(fan, format="pytorch").score(ids)
    engines = {}
    for engine in ("ggml", "torch"):
        try:
            engines[engine] = load_backend(path, format="gguf", engine=engine).score(ids)
        except Exception as err:  # ggml-python missing: the torch engine alone still must run it
            if engine == "ggml":
                pytest.importorskip("ggml", reason=str(err))
            raise
    scale = float(reference.abs().max())
    assert float((engines["ggml"] - engines["torch"]).abs().max()) < 0.05 * scale
    # Near the float model: 2.6-bit q2_k on random weights least of all.
    assert float((engines["torch"] - reference).abs().max()) < (0.8 if kind == "q2_k" else 0.5) * scale


# --- Importance matrices ------------------------------------------------------------------

@pytest.fixture(scope="module")
def importance(fan, tokenizer, corpus):
    model = load_backend(fan, format="pytorch").model
    windows = calibration_tokens(tokenizer, [str(corpus)], 6, 32)
    return model, windows, collect_importance(model, windows, progress=False)


def test_statistics_are_the_mean_square_of_each_layers_input(importance):
    """Block 0's FFN input is the norm of the residual after attention: recomputed by
    running the model's parts by hand, its per-column sum of squares is the hook's."""
    model, windows, stats = importance
    inputs = []
    block = model.blocks[0]
    handle = block.ffn_norm.register_forward_hook(lambda m, i, out: inputs.append(out.detach()))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    entry = stats["blocks.0.ffn.gate_proj.weight"]
    assert entry.count == windows.numel()
    np.testing.assert_allclose(entry.sum_x2, x.pow(2).sum(0).numpy(), rtol=1e-5)
    assert stats["blocks.0.ffn.up_proj.weight"].count == entry.count  # the same input
    assert {"blocks.0.attn.fan.proj.weight", "lm_head.weight"} <= set(stats)  # FANformer's own too


def test_imatrix_file_is_llama_cpps_format(importance, tmp_path):
    model, windows, stats = importance
    entries = gguf_entries(stats, model.config.tie_embeddings)
    path = write_imatrix(tmp_path / "m.imatrix.gguf", entries, ["corpus.txt"], len(windows), windows.shape[1])
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["corpus.txt"]
    assert reader.fields["imatrix.chunk_count"].contents() == len(windows)
    assert reader.fields["imatrix.chunk_size"].contents() == windows.shape[1]
    tensors = file_tensors(path)
    sums = tensors["blk.0.fan.weight.in_sum2"]
    assert sums.tensor_type == T.F32 and [int(n) for n in sums.shape] == [256]  # ne = [columns], as llama-imatrix
    assert [int(n) for n in tensors["blk.0.fan.weight.counts"].shape] == [1]
    means = read_imatrix(path)
    entry = stats["blocks.0.attn.fan.proj.weight"]
    np.testing.assert_allclose(means["blk.0.fan.weight"], entry.sum_x2 / entry.count, rtol=1e-6)
    assert "output.weight" in means  # the untied LM head under its own name


def test_an_imatrix_lowers_the_weighted_error_it_is_given(fan, importance, tmp_path):
    """ggml minimises sum_j imatrix_j (w_j - q_j)^2: with the matrix, that error falls."""
    model, windows, stats = importance
    imatrix = write_imatrix(tmp_path / "m.imatrix.gguf", gguf_entries(stats, False), ["c"], len(windows), 32)
    means = read_imatrix(imatrix)
    plain = file_tensors(export_gguf(fan, tmp_path / "plain.gguf", type="q4_k_m"))
    weighted = file_tensors(export_gguf(fan, tmp_path / "weighted.gguf", type="q4_k_m", imatrix=imatrix))
    state = {names.gguf_tensor_name(k): v.float().numpy() for k, v in model.state_dict().items()}
    better = 0
    for name, importance_row in means.items():
        if name not in plain or plain[name].tensor_type in (T.F32, T.F16):
            continue
        w = state[name]
        errors = [float((importance_row * (dequantize(np.asarray(f[name].data), f[name].tensor_type)
                                           .reshape(w.shape) - w) ** 2).sum()) for f in (plain, weighted)]
        better += errors[1] < errors[0]
        assert errors[1] <= errors[0] * 1.02, name
    assert better >= len(means) - 2


def test_imatrix_cli_and_export_flag(fan, corpus, tmp_path, cli_fails, capsys):
    from fanformer.cli import main

    out = tmp_path / "m.imatrix.gguf"
    assert main(["imatrix", fan, "--calib-data", corpus, "--chunks", "4", "--ctx", "32", "--out", out,
                 "--quiet"]) == 0
    assert "4 chunks of 32 tokens" in capsys.readouterr().out
    assert read_imatrix(out)
    assert main(["export", fan, "--format", "gguf", "--type", "q4_0", "--imatrix", out,
                 "--out", tmp_path / "q.gguf"]) == 0
    assert file_tensors(tmp_path / "q.gguf")["blk.0.ffn_down.weight"].tensor_type == T.Q4_1  # llama.cpp's guard
    assert main(["export", fan, "--format", "gguf", "--type", "q4_0", "--imatrix", out, "--pure",
                 "--out", tmp_path / "pure.gguf"]) == 0  # --pure: no guard, no Q6_K head
    assert {t.tensor_type for t in file_tensors(tmp_path / "pure.gguf").values()} == {T.Q4_0, T.F32}
    cli_fails(["export", fan, "--format", "gguf", "--type", "f16", "--pure", "--out", tmp_path / "x.gguf"],
              "--pure only applies to quantized types")
    cli_fails(["imatrix", fan, "--out", out, "--chunks", "4"], "already exists", "--force")
    cli_fails(["export", fan, "--format", "gguf", "--type", "f16", "--imatrix", out, "--out", tmp_path / "x.gguf"],
              "--imatrix only applies to quantized types")
    not_imatrix = export_gguf(fan, tmp_path / "model.gguf", type="q8_0")
    cli_fails(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--imatrix", not_imatrix,
               "--out", tmp_path / "y.gguf"], "not an importance matrix")
    cli_fails(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--imatrix", tmp_path / "none.gguf",
               "--out", tmp_path / "y.gguf"], "does not exist")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_calib_data_on_export_is_the_imatrix_files_quantization(fan, corpus, tmp_path, cli_fails):
    """`export --calib-data` (no --gptq) measures the importance matrix `fanformer imatrix`
    writes from the same windows, and quantizes with it: the same bytes as `--imatrix FILE`."""
    from fanformer.cli import main

    imatrix = tmp_path / "m.imatrix.gguf"
    assert main(["imatrix", fan, "--calib-data", corpus, "--chunks", "4", "--ctx", "64", "--out", imatrix,
                 "--quiet"]) == 0
    via_file = file_tensors(export_gguf(fan, tmp_path / "file.gguf", type="q4_k_m", imatrix=imatrix))
    assert main(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--calib-data", corpus,
                 "--calib-samples", "4"]) == 0
    direct = file_tensors(fan.with_name("ckpt-q4_k_m-imatrix.gguf"))  # the default name says how it was made
    plain = file_tensors(export_gguf(fan, tmp_path / "plain.gguf", type="q4_k_m"))
    assert direct.keys() == via_file.keys()
    for name, t in via_file.items():
        np.testing.assert_array_equal(np.asarray(direct[name].data), np.asarray(t.data), err_msg=name)
    assert any(not np.array_equal(np.asarray(direct[n].data), np.asarray(t.data)) for n, t in plain.items())
    cli_fails(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--calib-data", corpus, "--imatrix", imatrix,
               "--out", tmp_path / "x.gguf"], "give one of them")
    cli_fails(["export", fan, "--format", "gguf", "--type", "f16", "--calib-data", corpus,
               "--out", tmp_path / "x.gguf"], "only applies to quantized types")


def test_a_gptq_checkpoint_into_a_k_quant_is_requantized_and_says_why(fan, tmp_path, caplog):
    """GPTQ's grid (an fp16 scale and integer zero per group) is not a K-quant block's, so
    its dequantized weights are quantized into the mixture, with the reason logged."""
    from fanformer.quant.checkpoint import load_quantized_model, quantize_checkpoint
    from fanformer.quant.config import RTNConfig

    quantized = tmp_path / "rtn"
    quantize_checkpoint(fan, RTNConfig(bits=4, group_size=32), quantized, progress=False)
    with caplog.at_level(logging.WARNING, logger="fanformer.export.gguf_export"):
        path = export_gguf(quantized, tmp_path / "m.gguf", type="q4_k_m")
    assert "cannot hold its groups exactly" in caplog.text and "quantizing its dequantized weights to q4_k_m" in caplog.text
    found = file_tensors(path)
    layer = load_quantized_model(quantized).blocks[0].ffn.up_proj
    t = found["blk.0.ffn_up.weight"]
    assert t.tensor_type == T.Q4_K
    expected = layer.dequantized_weight().numpy()
    got = dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape)
    assert np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)) < RMS_BOUND[T.Q4_K]


# --- GPTQ on the Q4_K grid ------------------------------------------------------------------

def test_gptq_on_the_q4_k_grid_lowers_the_layer_output_error():
    """GPTQ's objective, ||W X - Q X||^2 over the calibration inputs X: its Q4_K blocks beat
    ggml's own Q4_K quantizer, plain and weighted by the same Hessian diagonal, on inputs
    with correlated columns (where error feedback has something to exploit)."""
    from fanformer.quant.gptq_k import gptq_q4_k
    from fanformer.quant.gptq import Hessian

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=g)
    mixing = torch.randn(512, 512, generator=g) / 512**0.5 + torch.eye(512)
    X = torch.randn(2048, 512, generator=g) @ mixing  # (tokens, in)
    hessian = Hessian(512)
    hessian.add_batch(X[None])
    data, dequantized, loss = gptq_q4_k(W, hessian.H)
    assert data.shape == (64, 2 * 144) and loss > 0
    np.testing.assert_array_equal(dequantized.numpy(), dequantize(data, T.Q4_K).reshape(64, 512))

    def output_error(Q: torch.Tensor) -> float:
        return float(((W - Q) @ X.t()).pow(2).sum())

    plain = torch.from_numpy(dequantize(kquants.quantize(W.numpy(), T.Q4_K), T.Q4_K)).reshape(W.shape)
    weighted = torch.from_numpy(dequantize(kquants.quantize(W.numpy(), T.Q4_K, torch.diag(hessian.H).numpy()),
                                           T.Q4_K)).reshape(W.shape)
    assert output_error(dequantized) < 0.8 * min(output_error(plain), output_error(weighted))


def test_gptq_export_writes_the_mixture_and_runs(fan, corpus, tmp_path, caplog, cli_fails):
    with caplog.at_level(logging.INFO, logger="fanformer.quant.gptq_k"):
        path = export_gguf(fan, tmp_path / "m.gguf", type="q4_k_m", gptq=True, calib_data=[str(corpus)],
                           calib_samples=4, progress=False)
    assert "GPTQ on the Q4_K grid: " in caplog.text
    model = load_backend(fan, format="pytorch").model
    c = model.config
    found = file_tensors(path)
    for key, value in model.state_dict().items():
        name = names.gguf_tensor_name(key)
        if value.ndim == 2 and name != "token_embd.weight":
            wanted = kquants.mixture_type(name, "q4_k_m", c.n_layers, c.n_heads // c.n_kv_heads, False, True)
            assert found[name].tensor_type == kquants.fallback_type(wanted, value.shape[1]), name
            got = dequantize(np.asarray(found[name].data), found[name].tensor_type).reshape(value.shape)
            rms = np.sqrt(np.mean((got - value.numpy()) ** 2) / np.mean(value.numpy() ** 2))
            assert rms < 2 * RMS_BOUND[found[name].tensor_type], (name, rms)  # GPTQ trades weight error for output
    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    scores = [load_backend(path, format="gguf", engine=e).score(ids) for e in ("torch",)]
    assert torch.isfinite(scores[0]).all()
    cli_fails(["export", fan, "--format", "gguf", "--type", "f16", "--gptq", "--out", tmp_path / "x.gguf"],
              "--gptq only applies to quantized types")
    cli_fails(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--calib-samples", "4",
               "--out", tmp_path / "x.gguf"], "--calib-samples only applies with --calib-data or --gptq")


def test_gptq_checkpoint_on_the_q4_k_grid_is_carried_byte_for_byte(fan, corpus, tmp_path, caplog, cli_fails):
    """`quantize --method gptq --grid q4_k_m` then `export --type q4_k_m` writes exactly the
    file `export --type q4_k_m --gptq` writes from the float checkpoint (the same pass, its
    blocks kept in the checkpoint); the checkpoint's PyTorch form computes with the file's
    numbers; another type re-quantizes with the reason logged; ONNX refuses the blocks."""
    from fanformer.quant.checkpoint import quantize_checkpoint
    from fanformer.quant.config import GPTQConfig

    ckpt = tmp_path / "gptq-q4_k_m"
    # With the progress bar, as `fanformer quantize` runs it (no option of the pass may hang on it).
    quantize_checkpoint(fan, GPTQConfig(grid="q4_k_m", calib_samples=4, lm_head=True), ckpt,
                        calib_data=[str(corpus)], progress=True)
    direct = export_gguf(fan, tmp_path / "direct.gguf", type="q4_k_m", gptq=True, calib_data=[str(corpus)],
                         calib_samples=4, progress=False)
    with caplog.at_level(logging.INFO, logger="fanformer.export.gguf_export"):
        carried = export_gguf(ckpt, tmp_path / "carried.gguf", progress=False)  # no --type: the checkpoint's
    assert "carrying 65 tensors of llama.cpp blocks (q4_k_m)" in caplog.text  # 8 linears x 8 blocks + head
    ours, theirs = file_tensors(carried), file_tensors(direct)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(t.data), err_msg=name)
    assert GGUFReader(carried).fields["general.file_type"].contents() == int(kquants.MIXTURES["q4_k_m"].file_type)

    # The checkpoint's PyTorch form computes with exactly the file's numbers (the embedding,
    # which the checkpoint keeps in float and the mixture quantizes, aside).
    model = load_backend(ckpt, format="pytorch").model
    for name, module in model.named_modules():
        if hasattr(module, "qblocks"):
            t = ours[names.gguf_tensor_name(f"{name}.weight")]
            expected = dequantize(np.asarray(t.data), t.tensor_type).reshape(module.out_features, -1)
            np.testing.assert_array_equal(module.dequantized_weight().numpy(), expected, err_msg=name)
    ids = torch.randint(3, 400, (1, 24), generator=torch.Generator().manual_seed(1))
    reference = load_backend(fan, format="pytorch").score(ids)
    with torch.no_grad():
        p, q = reference.log_softmax(-1), model(ids).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert 0 < float(kl) < 0.05

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fanformer.export.gguf_export"):
        other = export_gguf(ckpt, tmp_path / "q6.gguf", type="q6_k", progress=False)
    assert "q4_k_m blocks are not q6_k's: quantizing its dequantized weights to q6_k instead" in caplog.text
    assert file_tensors(other)["blk.0.attn_q.weight"].tensor_type == T.Q6_K
    cli_fails(["export", ckpt, "--format", "onnx", "--out", tmp_path / "onnx"], "llama.cpp blocks",
              "--format gguf")
    cli_fails(["quantize", fan, "--method", "gptq", "--grid", "q4_k_m", "--bits", "8", "--out", tmp_path / "x"],
              "bits 8 does not apply")

    # A damaged quantization_config is one clear error, before anything is allocated.
    def damaged(edit) -> Path:
        copy = tmp_path / f"damaged-{len(list(tmp_path.glob('damaged-*')))}"
        shutil.copytree(ckpt, copy)
        config = json.loads((copy / "config.json").read_text())
        edit(config["quantization_config"])
        (copy / "config.json").write_text(json.dumps(config))
        return copy

    for edit, fragment in ((lambda q: q["tensor_types"].update({"blocks.0.attn.q_proj": "q2_k"}), "ggml type 'q2_k'"),
                           (lambda q: q["tensor_types"].pop("lm_head"), "names 64 layers"),
                           (lambda q: q.update(grid="q9_k"), "needs a grid"),
                           (lambda q: q["tensor_types"].update({"blocks.0.attn.q_proj": "q6_k"}), "shape"),
                           (lambda q: q["tensor_types"].update({"blocks.0.attn.q_proj": ["q4_k"]}), "ggml type")):
        cli_fails(["generate", damaged(edit), "--prompt", "x", "--max-new-tokens", "1"], fragment)
    # A Q4_K super-block's fp16 scale d set to inf: named at load.
    from safetensors.torch import load_file, save_file

    copy = damaged(lambda q: None)
    state = load_file(copy / "model.safetensors")
    blocks = state["blocks.0.ffn.up_proj.qblocks"].clone()
    blocks[0, 0:2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +inf, little-endian
    state["blocks.0.ffn.up_proj.qblocks"] = blocks
    save_file(state, copy / "model.safetensors")
    cli_fails(["generate", copy, "--prompt", "x", "--max-new-tokens", "1"], "blocks.0.ffn.up_proj.qblocks",
              "non-finite")



@pytest.mark.skipif(llama_cpp_tool("llama-imatrix") is None or llama_cpp_tool("llama-quantize") is None,
                    reason="llama.cpp's llama-imatrix / llama-quantize are not installed (PATH or $LLAMA_CPP_BIN)")
def test_llama_imatrix_files_are_read_as_llama_quantize_reads_them(llama, corpus, tmp_path):
    """An importance matrix written by llama.cpp's own llama-imatrix, given to our export and
    to llama-quantize, gives the same Q4_K_M bytes."""
    f32 = export_gguf(llama, tmp_path / "f32.gguf", type="f32", arch="llama")
    text = tmp_path / "calibration.txt"
    text.write_text("".join(json.loads(line)["text"] for line in (corpus / "code.jsonl").read_text().splitlines()))
    theirs_imatrix = tmp_path / "llama.imatrix.gguf"
    run = subprocess.run([llama_cpp_tool("llama-imatrix"), "-m", str(f32), "-f", str(text), "-c", "64",
                          "--chunks", "4", "-t", "1", "-o", str(theirs_imatrix)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_imatrix(theirs_imatrix)  # its names and shapes pass our checks
    ours = export_gguf(llama, tmp_path / "ours.gguf", type="q4_k_m", arch="llama", imatrix=theirs_imatrix)
    assert_same_tensors(ours, llama_quantize(f32, tmp_path / "theirs.gguf", "q4_k_m", imatrix=theirs_imatrix))


def test_output_and_token_embedding_types_override_the_mixture(fan, tmp_path):
    """--output-tensor-type / --token-embedding-type set those two tensors' types (as
    llama-quantize's flags do) and leave every other tensor's bytes as the mixture wrote them."""
    from fanformer.cli import main

    plain = file_tensors(export_gguf(fan, tmp_path / "plain.gguf", type="q4_k_m"))
    out = tmp_path / "chosen.gguf"
    assert main(["export", fan, "--format", "gguf", "--type", "q4_k_m", "--output-tensor-type", "q8_0",
                 "--token-embedding-type", "q6_k", "--out", out]) == 0
    chosen = file_tensors(out)
    assert chosen["output.weight"].tensor_type == T.Q8_0 and plain["output.weight"].tensor_type == T.Q6_K
    assert chosen["token_embd.weight"].tensor_type == T.Q6_K and plain["token_embd.weight"].tensor_type == T.Q4_K
    for name, t in plain.items():
        if name not in ("output.weight", "token_embd.weight"):
            np.testing.assert_array_equal(np.asarray(chosen[name].data), np.asarray(t.data), err_msg=name)
    model = load_backend(fan, format="pytorch").model
    w = model.embed.weight.detach().numpy()
    got = dequantize(np.asarray(chosen["token_embd.weight"].data), T.Q6_K).reshape(w.shape)
    assert np.sqrt(np.mean((got - w) ** 2) / np.mean(w ** 2)) < RMS_BOUND[T.Q6_K]
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line error for a choice it does not offer
        main(["export", str(fan), "--format", "gguf", "--type", "q4_k_m", "--output-tensor-type", "q7_k",
              "--out", str(tmp_path / "x.gguf")])
    assert exited.value.code == 2


@pytest.mark.parametrize("kind,flags", [("q4_k_m", {"output_tensor_type": "q8_0", "token_embedding_type": "q6_k"}),
                                        ("q4_0", {"output_tensor_type": "q4_0"})])
def test_tensor_type_flags_are_llama_quantizes(llama, kind, flags, tmp_path):
    """Our flags write what llama-quantize's flags of the same names write (q4_0 with its
    LM head kept in Q4_0 too)."""
    f32 = export_gguf(llama, tmp_path / "f32.gguf", type="f32", arch="llama")
    ours = export_gguf(llama, tmp_path / "ours.gguf", type=kind, arch="llama", **flags)
    assert_same_tensors(ours, llama_quantize(f32, tmp_path / "theirs.gguf", kind, **flags))
