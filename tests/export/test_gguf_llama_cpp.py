"""llama.cpp itself runs the `--arch llama` export (export/gguf_export.py) of a p = 0,
pre-norm checkpoint with no CoLA and no gates, and computes what the checkpoint computes.

This is the independent check of the llama layout, above all of the Q/K row permutation
to llama.cpp's interleaved RoPE (convert_hf_to_gguf.py's LlamaModel.permute): the other
tests can only undo it with this project's own inverse. llama.cpp runs through
llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp; not a
project dependency), and the module is skipped without it.

A build with ggml's AMX kernels (GGML_NATIVE on a CPU with AMX) segfaults in
`ggml_backend_amx_mul_mat` on quantized weights on some machines, this project's test
machine among them (ggml-org/llama.cpp#20824, open): on such a build the quantized case
is skipped with the flags for a build without AMX.
"""

import numpy as np
import pytest
import torch

from fanformer.export import gguf_export
from fanformer.export import gguf_format as names
from fanformer.export.gguf_export import export_gguf
from fanformer.checkpoint import save_checkpoint
from fanformer.runtime import load_backend, reference_greedy

llama_cpp = pytest.importorskip("llama_cpp")

GGML_TYPE_F32 = 0  # ggml.h's enum ggml_type: an fp32 KV cache, so f32 weights leave nothing rounded
NO_AMX_BUILD = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
                "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON' pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python")


def skip_if_amx_quantized(type_: str) -> None:
    """Quantized weights go to ggml's AMX kernels when the build has them (see above)."""
    if type_.startswith("q") and b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        pytest.skip(f"this llama.cpp build runs {type_} through ggml's AMX kernels, which segfault here "
                    f"(ggml-org/llama.cpp#20824); rebuild without them: {NO_AMX_BUILD}")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama_checkpoint(request, tmp_path_factory, train_overfit):
    """A tiny Llama (p = 0, pre-norm, GQA) overfit as tests/export/conftest.py's model is:
    peaked next-token distributions, so greedy tokens are a meaningful check."""
    model, tokenizer, _ = train_overfit(p=0.0, tie_embeddings=request.param)
    return save_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", model, tokenizer)


def llama_cpp_logits(path, ids: list[int], n_ctx: int) -> torch.Tensor:
    """llama.cpp's logits (T, vocab) for every position of `ids`, f32 KV cache."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=GGML_TYPE_F32,
                          type_v=GGML_TYPE_F32, n_threads=torch.get_num_threads(), verbose=False)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)]))


def llama_cpp_greedy(path, prompt: list[int], max_new_tokens: int, n_ctx: int) -> list[int]:
    """Greedy tokens from llama.cpp, one eval per token over its own KV cache."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True,
                          n_threads=torch.get_num_threads(), verbose=False)
    llm.eval(prompt)
    out = []
    for _ in range(max_new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def prompt_ids(checkpoint) -> list[int]:
    return load_backend(checkpoint).tokenizer.encode("def add(a, b):\n    return a + b\nFourier features").ids


def test_f32_file_gives_the_checkpoint_logits(llama_checkpoint, tmp_path):
    path = export_gguf(llama_checkpoint, tmp_path / "model.gguf", type="f32", arch=names.LLAMA_ARCH)
    reference = load_backend(llama_checkpoint)
    ids = prompt_ids(llama_checkpoint)
    expected = reference.score(torch.tensor([ids]))[0]
    got = llama_cpp_logits(path, ids, reference.info.max_seq_len)
    # fp32 throughout; only the order of summation differs between ggml and torch (measured: 2e-7 relative).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_unpermuted_rows_would_be_caught(llama_checkpoint, tmp_path, monkeypatch):
    """Without the permutation llama.cpp rotates the wrong pairs of Q and K: the check
    above fails, so it does test the layout."""
    monkeypatch.setattr(gguf_export, "llama_permute", lambda weight, n_head: weight)
    path = export_gguf(llama_checkpoint, tmp_path / "wrong.gguf", type="f32", arch=names.LLAMA_ARCH)
    reference = load_backend(llama_checkpoint)
    ids = prompt_ids(llama_checkpoint)
    expected = reference.score(torch.tensor([ids]))[0]
    got = llama_cpp_logits(path, ids, reference.info.max_seq_len)
    assert float((got - expected).abs().max()) > 1e-2 * float(expected.abs().max())


@pytest.mark.parametrize("type_", ["f16", "q8_0"])
def test_greedy_tokens_match_the_checkpoint(type_, llama_checkpoint, tmp_path):
    skip_if_amx_quantized(type_)
    path = export_gguf(llama_checkpoint, tmp_path / f"model-{type_}.gguf", type=type_, arch=names.LLAMA_ARCH)
    reference = load_backend(llama_checkpoint)
    ids = prompt_ids(llama_checkpoint)
    expected = reference_greedy(reference, ids, 16)
    assert len(expected) == 16  # the overfit model does not stop early
    assert llama_cpp_greedy(path, ids, 16, reference.info.max_seq_len) == expected
