"""Checkpoint directories in the Hugging Face layout, written atomically, never pickled.

    config.json              transformers config (model_type "fanformer") = FANformerConfig fields
    model.safetensors        weights, keys of `FANformer.state_dict()` (tied lm_head omitted)
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
    generation_config.json
    training_state.safetensors + trainer_state.json   (only while training: optimizer, RNG, step)
    sharded/                 an FSDP run's weights, optimizer and RNG as torch.distributed.checkpoint
                             shards, in place of training_state.safetensors (fanformer/fsdp.py); its
                             model.safetensors is written when the run ends

A directory is written beside its destination under a temporary name and swapped in
with renames, so a crash leaves the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.outputs import write_directory_atomically
from fanformer.model import FANformer
from fanformer.tokenizer import TOKENIZER_FILE
from fanformer.validate import (check_block_count, check_dtype, check_finite, foreign_errors, read_json,
                                safetensors_inventory)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_TYPE = "fanformer"  # config.json's model_type: what transformers' Auto classes dispatch on
TRAINING_STATE_FILE = "training_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint shards of an FSDP run
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
QUANTIZATION_KEY = "quantization_config"  # in config.json of a quantized checkpoint (quant/checkpoint.py)

# generation_config.json keys that generation reads (transformers' names), with their types;
# others are kept but unused.
GENERATION_KEYS = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "min_length": int,
                   "repetition_penalty": float, "bos_token_id": int, "eos_token_id": int, "pad_token_id": int}
GENERATION_RANGES = {"top_p": lambda v: 0 < v <= 1, "repetition_penalty": lambda v: v > 0}  # others: >= 0
# The seed card's inference defaults.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 100, "top_p": 0.85}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() or (Path(path) / WEIGHTS_FILE).is_file()


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing checkpoint (or any non-empty folder) without --force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FANformerError(f"output path {out} is a file; give a directory with --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        # The ONNX folder's model file (export/onnx_format.MODEL_FILE; the core cannot import upwards).
        what = ("an exported ONNX model" if (out / "model.onnx").is_file()
                else "a checkpoint" if is_checkpoint(out) else "files")
        raise FANformerError(f"output directory {out} already holds {what}; "
                             "choose another --out, or pass --force to overwrite it")
    return out


def hf_config_dict(config: FANformerConfig, special_ids: dict[str, int]) -> dict:
    """config.json content: the config fields plus what transformers needs to dispatch."""
    return {"model_type": MODEL_TYPE, "architectures": ["FANformerForCausalLM"],
            "tie_word_embeddings": config.tie_embeddings, **special_ids, **config.to_dict()}


def model_state_dict(model: FANformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, the tied LM head left out (safetensors
    refuses shared storage; loading re-ties it). `state`: the model's full state dict when it
    comes from elsewhere (gathered from FSDP shards)."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(out: str | Path, model: FANformer, tokenizer, *,
                    training_state: tuple[dict[str, torch.Tensor], dict] | None = None,
                    extra_files: dict[str, str] | None = None, config_extra: dict | None = None) -> Path:
    """Write a complete checkpoint directory at `out`, replacing any previous one.
    `extra_files` maps file names to text written alongside (e.g. the metrics log);
    `config_extra` adds keys to config.json (e.g. a quantized model's quantization_config)."""
    return write_directory_atomically(out, lambda tmp: write_checkpoint_files(
        tmp, model.config, tokenizer, model_state_dict(model), training_state=training_state,
        extra_files=extra_files, config_extra=config_extra))


def write_checkpoint_files(folder: Path, config: FANformerConfig, tokenizer, weights: dict[str, torch.Tensor] | None,
                           *, training_state: tuple[dict[str, torch.Tensor] | None, dict] | None = None,
                           extra_files: dict[str, str] | None = None, config_extra: dict | None = None) -> None:
    """A checkpoint's files into `folder`. `weights` (from `model_state_dict`) None leaves out
    model.safetensors, and training-state tensors None leave out training_state.safetensors:
    a sharded checkpoint keeps both in its shards."""
    from fanformer.tokenizer import save_tokenizer, special_token_ids

    special = special_token_ids(tokenizer)
    config_json = {**hf_config_dict(config, special), **(config_extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
    if weights is not None:
        save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    save_tokenizer(tokenizer, folder, model_max_length=config.max_seq_len)
    generation = {**special, **DEFAULT_SAMPLING}
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2))
    if training_state is not None:
        tensors, state = training_state
        if tensors is not None:
            save_file(tensors, str(folder / TRAINING_STATE_FILE))
        (folder / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def load_config(path: str | Path) -> FANformerConfig:
    """config.json of a checkpoint, checked against its weights file's header (layer count,
    embedding shape, sizes within the file's bytes) before anything the size of the model
    is built."""
    path = Path(path)
    if not path.exists():
        raise FANformerError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FANformerError(f"{path} is not a checkpoint directory (expected a folder with {', '.join(REQUIRED_FILES)})")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FANformerError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    config = FANformerConfig.from_file(path)
    weights = path / WEIGHTS_FILE
    inventory = safetensors_inventory(weights)
    config.check_sizes(weights.stat().st_size, path / CONFIG_FILE)
    check_block_count(config.n_layers, inventory, weights)
    embed = inventory.get("embed.weight")
    if embed is not None and embed[1] != (config.vocab_size, config.d_model):
        raise FANformerError(f"{weights}: tensor embed.weight has shape {embed[1]}, config.json implies "
                             f"{(config.vocab_size, config.d_model)} (vocab_size, d_model)")
    return config


def read_quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config` (a quantized checkpoint), or None (a float one)."""
    try:
        found = json.loads((Path(path) / CONFIG_FILE).read_text()).get(QUANTIZATION_KEY)
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # load_config reports what is wrong with the file
    return found if isinstance(found, dict) else None


def load_generation_config(path: str | Path) -> dict:
    """generation_config.json of a checkpoint or exported folder; {} when there is none."""
    file = Path(path) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return {}
    generation = read_json(file)
    for key, value in generation.items():
        kind = GENERATION_KEYS.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if kind is bool and not isinstance(value, bool) or kind is int and not (number and float(value).is_integer()) \
                or kind is float and not number:
            raise FANformerError(f"{file}: {key} is {value!r}, expected {'true or false' if kind is bool else 'a number'}")
        if kind is not bool and not GENERATION_RANGES.get(key, lambda v: v >= 0)(value):
            raise FANformerError(f"{file}: {key} is {value!r}, out of range")
    return generation


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with foreign_errors(f"{path} is corrupted or truncated; re-create it from a good copy"):  # Rust panics too
        return load_file(str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> FANformer:
    """Rebuild the model from config.json and load model.safetensors, strictly."""
    path = Path(path)
    config = load_config(path)
    if read_quantization_config(path) is not None:
        raise FANformerError(f"{path} is a quantized checkpoint; load it with quant.checkpoint.load_quantized_model "
                             "(runtime.load_backend does), or quantize its float checkpoint")
    with torch.device("meta"):
        model = FANformer(config)
    return load_state(model, load_safetensors(path / WEIGHTS_FILE), path, device, dtype)


def load_state(model: FANformer, state: dict[str, torch.Tensor], path: Path,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> FANformer:
    """Assign `state` to a meta-device `model` after checking it matches key for key and
    shape for shape; re-tie the LM head; move to device/dtype; eval mode."""
    config = model.config
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise FANformerError(
            f"{path / WEIGHTS_FILE} does not match its config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; the checkpoint is damaged or mixed from two models")
    shapes = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[key].shape):
            raise FANformerError(f"{path / WEIGHTS_FILE}: tensor {key} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(shapes[key].shape)}")
        check_dtype(key, tensor.dtype, shapes[key].dtype, path / WEIGHTS_FILE)
        check_finite(key, tensor, path / WEIGHTS_FILE)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is an FSDP run's checkpoint (weights and optimizer in DCP shards)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The optimizer/RNG tensors and trainer_state.json of a checkpoint; the tensors are None
    for a sharded checkpoint, whose shards fanformer.fsdp.load_sharded reads."""
    path = Path(path)
    tensors_file, state_file = path / TRAINING_STATE_FILE, path / TRAINER_STATE_FILE
    sharded = is_sharded(path)
    if not ((tensors_file.is_file() or sharded) and state_file.is_file()):
        raise FANformerError(f"{path} has no training state to resume from (expected {TRAINING_STATE_FILE} "
                             f"and {TRAINER_STATE_FILE}; a run stopped before its first checkpoint "
                             "leaves none): start it again with --force")
    state = read_json(state_file)
    return (None if sharded else load_safetensors(tensors_file)), state
