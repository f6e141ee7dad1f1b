"""GGUF export (export/gguf_export.py): every weight type round-trips through gguf-py's
reader within a bound derived from its block format, the metadata and tokenizer are
complete, row lengths that do not fit a quant block fall back to f16, the `llama`
export carries llama.cpp's names and layout (checked by undoing the Q/K permutation
and by RoPE-ing both layouts), and the file is written all at once or not at all."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType, TokenType
from gguf.quants import dequantize
from tokenizers import Tokenizer, models, pre_tokenizers

from fanformer.export import default_output
from fanformer.export import gguf_export
from fanformer.export import gguf_format as names
from fanformer.quant import kquants
from fanformer.export.gguf_export import export_gguf
from fanformer.checkpoint import load_model, model_state_dict, save_checkpoint
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, apply_rope, rope_cos_sin
from fanformer.tokenizer import train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20
TYPES = [t for t in names.WEIGHT_TYPES if t not in kquants.MIXTURES]  # K-quants: test_kquants.py
T = GGMLQuantizationType
GGUF_DUMP = Path(sys.executable).parent / "gguf-dump"  # console script shipped with gguf
# Every option at once; CoLA rank in/2 keeps every row length (64, 192, the ranks 32 and
# 96) a multiple of 32, so this model never falls back.
ALL_OPTIONS = dict(p=0.15, norm="hybrid", cola_rank=0.5, cola_lm_head=True, gated_residual=True, fan_activation="gelu")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


@pytest.fixture(scope="module")
def make_checkpoint(tokenizer, tmp_path_factory):
    def make(name: str, **overrides) -> Path:
        overrides.setdefault("vocab_size", tokenizer.get_vocab_size())
        torch.manual_seed(0)
        model = FANformer(FANformerConfig.from_name("tiny", **overrides))
        with torch.no_grad():  # non-trivial norms and gates (they start at 1 and 0)
            for key, param in model.named_parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param) * 0.1)
        path = tmp_path_factory.mktemp(name) / "ckpt"
        save_checkpoint(path, model, tokenizer)
        return path
    return make


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("all", **ALL_OPTIONS)


@pytest.fixture(scope="module")
def exports(checkpoint):
    return {t: export_gguf(checkpoint, checkpoint.with_name(f"model-{t}.gguf"), type=t) for t in TYPES}


@pytest.fixture(scope="module")
def llama_checkpoint(make_checkpoint, tokenizer):
    # Tied embeddings (output.weight left out) and 16 embedding rows beyond the tokenizer.
    return make_checkpoint("llama", p=0.0, tie_embeddings=True, vocab_size=tokenizer.get_vocab_size() + 16)


@pytest.fixture(scope="module")
def llama_export(llama_checkpoint):
    return export_gguf(llama_checkpoint, llama_checkpoint.with_name("llama-f32.gguf"), type="f32", arch="llama")


def field(reader: GGUFReader, key: str):
    assert key in reader.fields, f"missing key {key}"
    return reader.fields[key].contents()


def tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model_state_dict(load_model(path)).items()}


# --- Error bounds, from the block formats (ggml-quants.c) ----------------------------
# Blocks of 32 along a row. Symmetric types store a f16 scale d and integers q in
# [-2^(b-1), 2^(b-1) - 1]; the value of largest |x| maps to -2^(b-1) exactly (q8_0: the
# range is +-127, d = amax/127), so the other extreme may be clipped by one whole step.
# Asymmetric types store f16 d = (max - min)/(2^b - 1) and f16 m = min, and round.
# Storing d in f16 moves each value by |q| * |d - f16(d)| <= |q| * d * 2^-11; storing m
# moves it by |min| * 2^-11. A little slack covers float32 arithmetic.
F16_EPS = 2.0 ** -11
SYMMETRIC = {T.Q8_0: (127, 127, 0.5), T.Q5_0: (16, 16, 1.0), T.Q4_0: (8, 8, 1.0)}  # amax/step, max |q|, steps of error
ASYMMETRIC = {T.Q5_1: 31, T.Q4_1: 15}  # range / step (= max q)


def error_bound(original: np.ndarray, qtype) -> np.ndarray:
    """Largest |dequantized - original| the format allows, elementwise."""
    if qtype == T.F32:
        return np.zeros_like(original)
    if qtype == T.F16:  # round to nearest: half an ulp; below 2^-14 the spacing is 2^-24
        return np.abs(original) * F16_EPS + 2.0 ** -25
    if qtype == T.BF16:  # 8 significant bits, round to nearest even
        return np.abs(original) * 2.0 ** -8
    blocks = original.reshape(-1, 32)
    slack = 1e-6 * np.abs(blocks).max(axis=1, keepdims=True) + 1e-8
    if qtype in SYMMETRIC:
        steps_per_amax, q_max, error_steps = SYMMETRIC[qtype]
        d = np.abs(blocks).max(axis=1, keepdims=True) / steps_per_amax
        bound = d * (error_steps + q_max * F16_EPS) + slack
    else:
        q_max = ASYMMETRIC[qtype]
        low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d = (high - low) / q_max
        bound = d * (0.5 + q_max * F16_EPS) + np.abs(low) * F16_EPS + slack
    return np.broadcast_to(bound, blocks.shape).reshape(original.shape)


def check_round_trip(path: Path, original: dict[str, np.ndarray], expected_type) -> dict:
    """Each checkpoint tensor is in the file under its GGUF name, of `expected_type(name, array)`,
    and dequantizes to within the format's bound. Returns {name: type}."""
    found = tensors(GGUFReader(path))
    assert set(found) == {names.gguf_tensor_name(k) for k in original}
    types = {}
    for key, array in original.items():
        t = found[names.gguf_tensor_name(key)]
        types[t.name] = t.tensor_type
        assert t.tensor_type == expected_type(t.name, array), t.name
        assert tuple(int(n) for n in t.shape) == tuple(reversed(array.shape)), t.name  # ne[0] = row length
        got = dequantize(t.data, t.tensor_type).reshape(array.shape)
        error = np.abs(got - array)
        assert (error <= error_bound(array, t.tensor_type)).all(), (t.name, float(error.max()))
    return types


# --- Weights --------------------------------------------------------------------

@pytest.mark.parametrize("type", TYPES)
def test_every_type_round_trips_within_its_format_bound(exports, checkpoint, type):
    weight_type = names.WEIGHT_TYPES[type][0]
    types = check_round_trip(exports[type], weights(checkpoint),
                             lambda name, array: T.F32 if array.ndim == 1 else weight_type)
    assert T.F32 in types.values() and weight_type in types.values()


def test_quantized_files_shrink_as_their_bits_say(exports):
    sizes = {t: exports[t].stat().st_size for t in TYPES}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q5_1"] > sizes["q5_0"] \
        > sizes["q4_1"] > sizes["q4_0"]


def test_the_bounds_are_not_vacuous(exports, checkpoint):
    """q4_0 really is coarser than q8_0: its error exceeds q8_0's bound somewhere."""
    original = weights(checkpoint)["blocks.0.ffn.up_proj.lora_a.weight"]
    name = names.gguf_tensor_name("blocks.0.ffn.up_proj.lora_a.weight")
    t = tensors(GGUFReader(exports["q4_0"]))[name]
    error = np.abs(dequantize(t.data, t.tensor_type).reshape(original.shape) - original)
    assert (error > error_bound(original, T.Q8_0)).any()


# --- Metadata and tokenizer ---------------------------------------------------------

def expected_hyperparameters(c: FANformerConfig) -> dict[str, object]:
    return {
        names.CONTEXT_LENGTH: c.max_seq_len, names.EMBEDDING_LENGTH: c.d_model, names.BLOCK_COUNT: c.n_layers,
        names.FEED_FORWARD_LENGTH: c.ffn_dim, names.HEAD_COUNT: c.n_heads, names.HEAD_COUNT_KV: c.n_kv_heads,
        names.KEY_LENGTH: c.head_dim, names.VALUE_LENGTH: c.head_dim, names.RMS_EPS: c.norm_eps,
        names.ROPE_FREQ_BASE: c.rope_theta, names.ROPE_DIMENSION_COUNT: c.head_dim, names.VOCAB_SIZE: c.vocab_size,
    }


def expected_project_keys(c: FANformerConfig) -> dict[str, object]:
    return {
        names.FAN_PERIODIC_RATIO: c.p, names.FAN_PERIODIC_LENGTH: int(c.d_model * c.p),
        names.FAN_ACTIVATION: c.fan_activation, names.NORM_SCHEME: c.norm, names.COLA_RANK_RATIO: c.cola_rank,
        names.COLA_LM_HEAD: c.cola_lm_head, names.GATED_RESIDUAL: c.gated_residual,
        names.TIE_EMBEDDINGS: c.tie_embeddings,
    }


def check_keys(reader: GGUFReader, arch: str, expected: dict[str, object]) -> None:
    """llama.cpp's float keys are float32; the project's ratios float64, so p comes back exactly."""
    for key, value in expected.items():
        got = field(reader, key.format(arch=arch))
        if key in (names.FAN_PERIODIC_RATIO, names.COLA_RANK_RATIO):
            assert reader.fields[key.format(arch=arch)].types == [GGUFValueType.FLOAT64] and got == value, key
        elif isinstance(value, float):
            assert got == float(np.float32(value)), key
        else:
            assert got == value and type(got) is type(value), key


@pytest.mark.parametrize("type", TYPES)
def test_metadata_is_complete(exports, checkpoint, type):
    reader = GGUFReader(exports[type])
    config = FANformerConfig.from_file(checkpoint)
    assert field(reader, "GGUF.version") == 3
    assert field(reader, names.GENERAL_ARCHITECTURE) == names.ARCH
    assert field(reader, names.GENERAL_NAME) == checkpoint.name
    assert field(reader, names.GENERAL_FILE_TYPE) == {
        "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0, "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1,
        "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}[type]
    assert field(reader, names.GENERAL_QUANTIZATION_VERSION) == GGML_QUANT_VERSION
    assert field(reader, names.GENERAL_ALIGNMENT) == reader.alignment == 32
    expected = {**expected_hyperparameters(config), **expected_project_keys(config)}
    assert set(expected) == set(names.FANFORMER_KEYS) >= set(names.REQUIRED_KEYS) | set(names.PROJECT_KEYS)
    check_keys(reader, names.ARCH, expected)


def test_tokenizer_is_embedded_complete(exports, checkpoint, tokenizer):
    reader = GGUFReader(exports["q4_0"])
    saved = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = {token: i for token, i in saved["model"]["vocab"].items()}
    vocab.update({t["content"]: t["id"] for t in saved["added_tokens"]})
    tokens = field(reader, names.TOKENIZER_TOKENS)
    assert tokens == sorted(vocab, key=vocab.get) and len(tokens) == tokenizer.get_vocab_size()
    assert field(reader, names.TOKENIZER_MERGES) == [" ".join(m) if isinstance(m, list) else m
                                                     for m in saved["model"]["merges"]]
    assert all(m.count(" ") == 1 for m in field(reader, names.TOKENIZER_MERGES))
    specials = {t["id"] for t in saved["added_tokens"] if t["special"]}
    assert len(specials) == 3
    assert field(reader, names.TOKENIZER_TOKEN_TYPE) == [
        TokenType.CONTROL if i in specials else TokenType.NORMAL for i in range(len(tokens))]
    assert field(reader, names.TOKENIZER_MODEL) == "gpt2"
    assert field(reader, names.TOKENIZER_PRE) == "gpt-2"
    assert tokens[field(reader, names.TOKENIZER_BOS_ID)] == "<|bos|>"
    assert tokens[field(reader, names.TOKENIZER_EOS_ID)] == "<|eos|>"
    assert tokens[field(reader, names.TOKENIZER_PAD_ID)] == "<|pad|>"
    assert field(reader, names.TOKENIZER_ADD_BOS) is False
    # Enough to tokenize with: a byte-level BPE rebuilt from the file alone encodes as the original.
    merges = [tuple(m.split(" ")) for m in field(reader, names.TOKENIZER_MERGES)]
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in [*TEXTS[:2], "def fourier(x):\n    return cos(x) + sin(x)  # ≈ π\n"]:
        assert rebuilt.encode(text).ids == tokenizer.encode(text).ids


# --- Fallback for rows that do not fill whole blocks -----------------------------

def test_rows_not_in_whole_blocks_fall_back_to_f16_and_are_reported(make_checkpoint, caplog):
    path = make_checkpoint("fallback", ffn_dim=200)  # ffn_down rows hold 200 = 6.25 blocks of 32
    out = path.with_name("fallback-q4_0.gguf")
    with caplog.at_level(logging.INFO, logger="fanformer.export.gguf_export"):
        export_gguf(path, out, type="q4_0")
    fell_back = {f"blk.{i}.ffn_down.weight" for i in range(2)}
    report = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(report) == 1 and all(name in report[0] for name in fell_back) and "f16" in report[0], report
    # llama.cpp's LM head is Q6_K, whose 256-wide blocks do not fit rows of 64: Q8_0 instead.
    assert "output.weight (q6_k -> q8_0)" in report[0], report

    def expected(name, array):
        return T.F32 if array.ndim == 1 else T.F16 if name in fell_back else T.Q8_0 if name == "output.weight" \
            else T.Q4_0
    check_round_trip(out, weights(path), expected)

    pure = export_gguf(path, path.with_name("fallback-q4_0-pure.gguf"), type="q4_0", pure=True)
    check_round_trip(pure, weights(path), lambda name, array: T.F32 if array.ndim == 1 else
                     T.F16 if name in fell_back else T.Q4_0)  # llama-quantize --pure: the head too

    caplog.clear()  # types with no block (f16, bf16, f32) never fall back
    with caplog.at_level(logging.INFO, logger="fanformer.export.gguf_export"):
        export_gguf(path, path.with_name("fallback-bf16.gguf"), type="bf16")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# --- The llama architecture ----------------------------------------------------------

LLAMA_TENSORS = ["token_embd.weight", "output_norm.weight"] + [
    f"blk.{i}.{name}.weight" for i in range(2) for name in
    ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]


def from_llama_layout(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K layout by indices: its row h*hs + 2i + c (pair i, c = 0 real,
    1 imaginary) is the Hugging Face row h*hs + c*hs/2 + i."""
    hs = weight.shape[0] // n_head
    hf_rows = np.empty(weight.shape[0], dtype=int)
    for h in range(n_head):
        for i in range(hs // 2):
            for c in range(2):
                hf_rows[h * hs + 2 * i + c] = h * hs + c * hs // 2 + i
    hf = np.empty_like(weight)
    hf[hf_rows] = weight
    return hf


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate pairs (2i, 2i+1) of (T, h, hs) by pos * theta^(-2i/hs)."""
    hs = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (T, 1, hs/2)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1).flatten(-2)


def test_llama_export_has_llama_cpp_names_keys_and_layout(llama_export, llama_checkpoint):
    reader = GGUFReader(llama_export)
    config = FANformerConfig.from_file(llama_checkpoint)
    assert field(reader, names.GENERAL_ARCHITECTURE) == "llama"
    check_keys(reader, "llama", expected_hyperparameters(config))
    assert not [k for k in reader.fields if k.startswith(names.ARCH + ".")]
    found = tensors(reader)
    assert sorted(found) == sorted(LLAMA_TENSORS)  # tied: no output.weight, llama.cpp reuses token_embd
    original = weights(llama_checkpoint)
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    for key, array in original.items():
        name = names.gguf_tensor_name(key)
        stored = dequantize(found[name].data, found[name].tensor_type).reshape(array.shape)
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if kind in heads:
            assert not np.array_equal(stored, array)  # permuted...
            np.testing.assert_array_equal(from_llama_layout(stored, heads[kind]), array)  # ...and only that
        else:
            np.testing.assert_array_equal(stored, array)
    # The padded embedding rows get llama.cpp's placeholder tokens.
    tokens = field(reader, names.TOKENIZER_TOKENS)
    assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert field(reader, names.TOKENIZER_TOKEN_TYPE)[-16:] == [TokenType.UNUSED] * 16


def test_llama_layout_with_interleaved_rope_gives_the_models_attention_scores(llama_export, llama_checkpoint):
    config = FANformerConfig.from_file(llama_checkpoint)
    found = tensors(GGUFReader(llama_export))
    original = weights(llama_checkpoint)
    hs, group = config.head_dim, config.n_heads // config.n_kv_heads
    x = torch.randn(5, config.d_model, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)
    cos, sin = rope_cos_sin(positions[None], hs, config.rope_theta)  # (1, 1, T, hs)

    def project(w, heads):
        return (x @ torch.from_numpy(np.array(w)).T).view(5, heads, hs)  # (T, h, hs)

    def hf_rope(y):
        return apply_rope(y.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)

    q_hf = hf_rope(project(original["blocks.1.attn.q_proj.weight"], config.n_heads))
    k_hf = hf_rope(project(original["blocks.1.attn.k_proj.weight"], config.n_kv_heads))
    q_ll = interleaved_rope(project(found["blk.1.attn_q.weight"].data.reshape(-1, config.d_model),
                                    config.n_heads), positions, config.rope_theta)
    k_ll = interleaved_rope(project(found["blk.1.attn_k.weight"].data.reshape(-1, config.d_model),
                                    config.n_kv_heads), positions, config.rope_theta)
    scores_hf = torch.einsum("thd,shd->hts", q_hf, k_hf.repeat_interleave(group, dim=1))
    scores_ll = torch.einsum("thd,shd->hts", q_ll, k_ll.repeat_interleave(group, dim=1))
    torch.testing.assert_close(scores_ll, scores_hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, blocker", [
    (dict(p=0.25), "p = 0.25"),
    (dict(p=0.0, norm="hybrid"), "norm = 'hybrid'"),
    (dict(p=0.0, cola_rank=0.25), "cola_rank = 0.25"),
    (dict(p=0.0, gated_residual=True), "gated_residual"),
])
def test_llama_is_refused_for_what_llama_cpp_cannot_run(make_checkpoint, overrides, blocker):
    path = make_checkpoint("nollama", **overrides)
    out = path.with_name("x.gguf")
    with pytest.raises(FANformerError, match="cannot be exported as a llama model") as error:
        export_gguf(path, out, arch="llama")
    assert blocker in str(error.value) and "--arch fanformer" in str(error.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


# --- Files: tooling, overwrite, atomicity, CLI ------------------------------------------

def test_gguf_dump_reads_every_file_written(exports, llama_export):
    assert GGUF_DUMP.is_file(), "gguf-dump ships with the gguf package"
    for path in [*exports.values(), llama_export]:
        result = subprocess.run([str(GGUF_DUMP), str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "tensor(s)" in result.stdout


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def test_cli_default_output_and_existing_output_needs_force(capsys, checkpoint, exports, cli_fails):
    out = default_output(checkpoint, "gguf", type="q8_0")
    assert out == checkpoint.with_name("ckpt-q8_0.gguf")
    assert default_output(checkpoint, "gguf", type="q8_0", arch="llama").name == "ckpt-llama-q8_0.gguf"
    assert default_output(checkpoint, "gguf", type="q4_0", pure=True).name == "ckpt-q4_0-pure.gguf"
    assert default_output(checkpoint, "gguf", type="q4_k_m", output_tensor_type="q8_0",
                          token_embedding_type="q6_k").name == "ckpt-q4_k_m-output-q8_0-embd-q6_k.gguf"
    assert main(["export", str(checkpoint), "--format", "gguf", "--type", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes() == exports["q8_0"].read_bytes()  # deterministic, and the CLI is the library
    out.write_bytes(b"mine")
    cli_fails(["export", checkpoint, "--format", "gguf", "--type", "q8_0"], "already exists", "--force")
    assert out.read_bytes() == b"mine"
    assert main(["export", str(checkpoint), "--format", "gguf", "--type", "q8_0", "--force"]) == 0
    assert out.read_bytes() == exports["q8_0"].read_bytes()
    out.unlink()
    assert leftovers(checkpoint.parent) == []


def test_cli_options_belong_to_their_format(capsys, checkpoint, tmp_path, cli_fails):
    cli_fails(["export", checkpoint, "--format", "gguf", "--dtype", "fp16", "--out", tmp_path / "a.gguf"],
              "--dtype", "--format onnx")
    cli_fails(["export", checkpoint, "--format", "gguf", "--quantize", "int4", "--block-size", "32",
                       "--out", tmp_path / "a.gguf"], "--quantize, --block-size", "--format onnx")
    cli_fails(["export", checkpoint, "--format", "onnx", "--type", "q8_0", "--out", tmp_path / "o"],
              "--type", "--format gguf")
    cli_fails(["export", checkpoint, "--format", "gguf", "--arch", "llama", "--out", tmp_path / "a.gguf"],
              "cannot be exported as a llama model", "p = 0.15")
    with pytest.raises(FANformerError, match="q3_k"):
        export_gguf(checkpoint, tmp_path / "a.gguf", type="q3_k")
    assert sorted(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_nothing_behind(monkeypatch, checkpoint, tmp_path):
    def broken(array, qtype):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf_export.quants, "quantize", broken)
    out = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(checkpoint, out, type="q8_0")
    assert sorted(tmp_path.iterdir()) == []
    out.write_bytes(b"old")  # with --force, a failure keeps the old file
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(checkpoint, out, type="q8_0", force=True)
    assert sorted(tmp_path.iterdir()) == [out] and out.read_bytes() == b"old"
