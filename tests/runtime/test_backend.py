import json

import pytest
import torch

from fanformer.checkpoint import load_model
from fanformer.errors import FANformerError
from fanformer.tokenizer import special_token_ids
from fanformer.runtime.backend import detect_format, load_backend
from fanformer.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 300, (2, 12))


def test_a_checkpoint_directory_is_detected_and_loaded(checkpoint, ids):
    assert detect_format(checkpoint) == "pytorch"
    backend = load_backend(checkpoint)
    assert isinstance(backend, TorchBackend)
    with torch.no_grad():
        expected = load_model(checkpoint)(ids)
    torch.testing.assert_close(backend.score(ids), expected, atol=0, rtol=0)


def test_info_matches_the_checkpoint_config_and_tokenizer(checkpoint, tokenizer):
    info = load_backend(checkpoint).info
    config = load_model(checkpoint).config
    special = special_token_ids(tokenizer)
    assert (info.vocab_size, info.max_seq_len) == (config.vocab_size, config.max_seq_len)
    assert (info.bos_id, info.eos_id, info.pad_id) == (special["bos_token_id"], special["eos_token_id"],
                                                       special["pad_token_id"])
    assert (info.format, info.path, info.dtype, info.device) == ("pytorch", str(checkpoint), "fp32", "cpu")
    assert load_backend(checkpoint, round_weights="fp16").info.dtype == "fp32 (fp16 weights)"


def test_paths_that_are_not_models_are_user_errors(tmp_path):
    with pytest.raises(FANformerError, match="does not exist"):
        load_backend(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FANformerError, match="not a model this tool can run"):
        load_backend(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"\x00\xffgarbage" * 64)
    with pytest.raises(FANformerError, match="not a model this tool can run"):
        load_backend(tmp_path / "x.bin")


@pytest.mark.parametrize("config_text, message", [
    ("{not json", r"config.json is not valid JSON \(Expecting property name"),  # the JSON error, not a shrug
    ("[1, 2]", "config.json holds a JSON list, expected a dict"),
    (json.dumps({"model_type": "llama"}), "not a model this tool can run"),
])
def test_a_directory_with_a_foreign_or_broken_config_is_not_detected(tmp_path, config_text, message):
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(FANformerError, match=message):
        detect_format(tmp_path)


def test_unknown_format_dtype_and_device(checkpoint):
    with pytest.raises(FANformerError, match="unknown format 'onnx2'.*pytorch"):
        load_backend(checkpoint, format="onnx2")
    with pytest.raises(FANformerError, match="unknown dtype 'fp8'"):
        load_backend(checkpoint, dtype="fp8")
    with pytest.raises(FANformerError, match="unknown device 'tpu'"):
        load_backend(checkpoint, device="tpu")
    with pytest.raises(FANformerError, match="unknown dtype 'int4'"):
        load_backend(checkpoint, round_weights="int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when there is no GPU")
def test_cuda_without_a_gpu(checkpoint):
    with pytest.raises(FANformerError, match="no CUDA GPU"):
        load_backend(checkpoint, device="cuda")
    assert load_backend(checkpoint, device="auto").info.device == "cpu"


@pytest.mark.parametrize("dtype, tol", [("fp16", 2e-2), ("bf16", 1e-1)])
def test_half_precision_on_cpu_is_close_to_fp32(checkpoint, ids, dtype, tol):
    expected = load_backend(checkpoint).score(ids)
    backend = load_backend(checkpoint, dtype=dtype)
    assert next(backend.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    logits = backend.score(ids)
    assert logits.dtype == torch.float32  # the Backend contract, whatever the compute dtype
    assert logits.abs().max() > 10 * tol  # the tolerance is small against the logits themselves
    torch.testing.assert_close(logits, expected, atol=tol, rtol=0)


def test_round_weights_fp16_rounds_every_weight_exactly(checkpoint):
    original = dict(load_model(checkpoint).named_parameters())
    rounded = dict(load_backend(checkpoint, round_weights="fp16").model.named_parameters())
    assert rounded.keys() == original.keys()
    changed = 0
    for name, w in original.items():
        assert rounded[name].dtype == torch.float32
        torch.testing.assert_close(rounded[name], w.detach().half().float(), atol=0, rtol=0)
        changed += int(not torch.equal(rounded[name], w))
    assert changed > 0  # fp32 init values are not fp16-representable: rounding did something


def test_from_model_wraps_an_in_memory_model(make_model, tokenizer, ids):
    model = make_model(seed=3)
    with torch.no_grad():
        expected = model(ids)
    backend = TorchBackend.from_model(model, tokenizer)
    torch.testing.assert_close(backend.score(ids), expected, atol=0, rtol=0)
    assert backend.info.path == "<memory>" and backend.info.vocab_size == model.config.vocab_size
    assert backend.tokenizer is tokenizer
    bare = TorchBackend.from_model(make_model(seed=3))
    assert (bare.info.bos_id, bare.info.eos_id, bare.info.pad_id) == (0, 1, 2)
    torch.testing.assert_close(bare.score(ids), expected, atol=0, rtol=0)


def test_prefill_then_decode_matches_scoring_the_whole_sequence(checkpoint, ids):
    """The cache path against the uncached one, with the second row left-padded by 3."""
    backend = load_backend(checkpoint)
    full = backend.score(ids)  # (2, 12, V)
    cache = backend.new_cache(2)
    prompt = ids[:, :6].clone()
    prompt[1, :3] = backend.info.pad_id
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    logits = [backend.prefill(cache, prompt, mask)]
    for t in range(6, 12):
        mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], dim=1)
        logits.append(backend.decode(cache, ids[:, t:t + 1], mask))
    logits = torch.cat(logits, dim=1)
    torch.testing.assert_close(logits[0], full[0], atol=1e-5, rtol=1e-5)
    # Row 1 is the unpadded sequence ids[1, 3:]: its logits must not depend on the padding.
    torch.testing.assert_close(logits[1, 3:], backend.score(ids[1:, 3:])[0], atol=1e-5, rtol=1e-5)
