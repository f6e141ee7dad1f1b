"""Hostile model files at the runtime: GGUF headers whose counts exceed the file, context
lengths no memory holds, ONNX and genai folders whose files disagree, third-party errors
while running, and NaN logits: each ends in one FANformerError (one CLI line, exit 2)."""

import json
import shutil
import struct

import pytest
import torch

from fanformer.errors import FANformerError
from fanformer.export import export, gguf_format as names
from fanformer.export import gguf_read
from fanformer.export.gguf_export import export_gguf
from fanformer.runtime import GenerationConfig, generate, load_backend
from fanformer.runtime import genai_backend


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    return export_gguf(checkpoint, tmp_path_factory.mktemp("hostile-gguf") / "model.gguf", type="f32")


@pytest.fixture(scope="module")
def onnx_folder(checkpoint, tmp_path_factory):
    return export(checkpoint, "onnx", tmp_path_factory.mktemp("hostile-onnx") / "onnx")


def overwrite_after_key(source, out, key: str, skip: int, fmt: str, value: int):
    """A copy of `source` with the field `skip` bytes after `key`'s name set to `value`."""
    data = bytearray(source.read_bytes())
    at = data.index(key.encode()) + len(key) + skip
    struct.pack_into(fmt, data, at, value)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("count", [10**6, 2**32, 2**63])
def test_gguf_array_count_beyond_the_file_is_refused_before_gguf_py_reads(gguf_file, tmp_path, monkeypatch, count):
    # key name, then value type (u32 ARRAY), element type (u32), element count (u64)
    bad = overwrite_after_key(gguf_file, tmp_path / "bad.gguf", names.TOKENIZER_TOKEN_TYPE, 8, "<Q", count)
    monkeypatch.setattr(gguf_read, "GGUFReader", lambda *a: pytest.fail("GGUFReader saw the hostile header"))
    with pytest.raises(FANformerError, match=rf"key {names.TOKENIZER_TOKEN_TYPE}'s element count is {count:,}"):
        load_backend(bad)


@pytest.mark.parametrize("blocks, message", [(3, "fanformer.block_count is 3, but the weights file holds blocks 0..1"),
                                             (10**9, "n_layers is 1,000,000,000, more than the")])
def test_gguf_block_count_must_match_the_tensors(gguf_file, tmp_path, blocks, message):
    key = names.BLOCK_COUNT.format(arch=names.ARCH)
    bad = overwrite_after_key(gguf_file, tmp_path / "bad.gguf", key, 4, "<I", blocks)  # after the u32 type
    with pytest.raises(FANformerError, match=message.replace(".", r"\.")):
        load_backend(bad, engine="torch")


def test_gguf_context_beyond_memory_is_refused(gguf_file, tmp_path):
    key = names.CONTEXT_LENGTH.format(arch=names.ARCH)
    bad = overwrite_after_key(gguf_file, tmp_path / "bad.gguf", key, 4, "<I", 2**32 - 1)
    pytest.importorskip("ggml")
    with pytest.raises(FANformerError, match=f"{key} 4,294,967,295 needs a .* GiB KV cache"):
        load_backend(bad, engine="ggml")


def test_gguf_nan_weight_is_named(gguf_file, tmp_path, rewrite):
    def poison(name, data, qtype):
        if name == "blk.0.attn_norm.weight":
            data = data.copy()
            data[2] = float("nan")
        return name, data, qtype
    bad = rewrite(gguf_file, tmp_path / "bad.gguf", tensor_edit=poison)
    with pytest.raises(FANformerError, match="tensor blk.0.attn_norm.weight holds 1 NaN"):
        load_backend(bad, engine="torch")


def test_onnx_run_errors_are_one_error(onnx_folder):
    backend = load_backend(onnx_folder)
    with pytest.raises(FANformerError, match="onnxruntime failed to run .*indices element out of data bounds"):
        backend.score(torch.tensor([[3, 10**6]]))


def test_onnx_graph_and_config_must_agree(onnx_folder, tmp_path):
    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(FANformerError, match="has 4 past_key_values inputs, but config.json's n_layers 3 calls for 6"):
        load_backend(folder)


@pytest.mark.parametrize("section, key, value", [("model", "vocab_size", 2**31 - 1),
                                                 ("model", "context_length", 10**12),
                                                 ("decoder", "num_hidden_layers", 40),
                                                 ("search", "num_beams", 4),
                                                 ("search", "top_p", "x")])
def test_genai_config_is_checked_before_genai_allocates(onnx_folder, tmp_path, monkeypatch, section, key, value):
    pytest.importorskip("onnxruntime_genai")
    folder = shutil.copytree(onnx_folder, tmp_path / "onnx")
    config = json.loads((folder / "genai_config.json").read_text())
    {"model": config["model"], "decoder": config["model"]["decoder"], "search": config["search"]}[section][key] = value
    (folder / "genai_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(genai_backend, "load_model", lambda *a: pytest.fail("genai loaded a damaged config"))
    with pytest.raises(FANformerError, match=f"genai_config.json: .*{key}"):
        load_backend(folder, format="genai")


def test_genai_run_errors_are_one_error(onnx_folder):
    pytest.importorskip("onnxruntime_genai")
    backend = load_backend(onnx_folder, format="genai")
    with pytest.raises(FANformerError, match="onnxruntime-genai failed on .*Gather"):
        backend.score(torch.tensor([[3, 10**6]]))


def test_damaged_config_json_reports_its_json_error(checkpoint, tmp_path, cli_fails):
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"model_type": "fanformer", "d_model": 64,,}')
    with pytest.raises(FANformerError, match=r"config.json is not valid JSON \(Expecting property name"):
        load_backend(folder)
    cli_fails(["generate", folder, "--prompt", "x"], "config.json is not valid JSON")


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_stop_generation(fake_backend, char_tokenizer, temperature):
    def logits(prefix):
        out = torch.zeros(char_tokenizer.vocab_size)
        out[5] = float("nan") if len(prefix) >= 4 else 1.0
        return out
    backend = fake_backend(logits, char_tokenizer.vocab_size, tokenizer=char_tokenizer)
    with pytest.raises(FANformerError, match="NaN or infinite logits at position 4"):
        generate(backend, ["abc"], GenerationConfig(max_new_tokens=5, temperature=temperature))


def test_an_overflowing_temperature_falls_back_to_the_greedy_choice(fake_backend, char_tokenizer):
    def logits(prefix):
        return torch.arange(char_tokenizer.vocab_size, dtype=torch.float32)
    backend = fake_backend(logits, char_tokenizer.vocab_size, tokenizer=char_tokenizer, eos_id=1)
    sampled = generate(backend, ["abc"], GenerationConfig(max_new_tokens=3, temperature=1e-300))[0]
    greedy = generate(backend, ["abc"], GenerationConfig(max_new_tokens=3, temperature=0))[0]
    assert sampled.token_ids == greedy.token_ids
