"""The files every fuzz case starts from: one tiny model in every form the project reads.

Each kind names the seed folder a case copies, the file in it the mutator damages, and the
`fanformer generate` arguments that load the folder and ask for three tokens (the sampling
path, the CLI's default, so that NaN logits would reach `torch.multinomial`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Kind:
    name: str  # the table's row
    seed: str  # the seed folder a case copies
    target: str  # the file in it that is damaged
    argv: tuple[str, ...] = ()  # extra `fanformer generate` arguments


# A GGUF file alternates between the ggml and torch engines (fuzz cases pick by parity).
KINDS = {k.name: k for k in [
    Kind("gguf", "gguf", "model.gguf"),
    Kind("safetensors", "float", "model.safetensors"),
    Kind("safetensors-gptq", "gptq", "model.safetensors"),
    Kind("safetensors-nf4", "nf4", "model.safetensors"),
    Kind("safetensors-int8", "int8", "model.safetensors"),
    Kind("config.json", "float", "config.json"),
    Kind("config.json-gptq", "gptq", "config.json"),
    Kind("tokenizer.json", "float", "tokenizer.json"),
    Kind("generation_config.json", "float", "generation_config.json"),
    Kind("model.onnx", "onnx", "model.onnx"),
    Kind("genai_config.json", "onnx", "genai_config.json", ("--format", "genai")),
    Kind("quant_report.json", "gptq", "quant_report.json"),
    Kind("safetensors-ggml", "ggml", "model.safetensors"),
    Kind("config.json-ggml", "ggml", "config.json"),
]}
TEXTS = ["def add(a, b):\n    return a + b\n", "Fourier features: cos, sin, période π ≈ 3.14 🙂\n"] * 20


def build_seeds(root: Path) -> Path:
    """Write the seed folders under `root` (skipped where already there); returns root."""
    from fanformer.checkpoint import load_model, save_checkpoint
    from fanformer.config import FANformerConfig
    from fanformer.export import export
    from fanformer.model import FANformer
    from fanformer.quant import quantize
    from fanformer.quant.checkpoint import quantize_checkpoint, save_quantized
    from fanformer.quant.config import BnbInt8Config, BnbNF4Config, GPTQConfig, RTNConfig
    from fanformer.tokenizer import load_tokenizer, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    float_dir = root / "float"
    if not float_dir.is_dir():
        tokenizer = train_tokenizer(TEXTS, 400)
        torch.manual_seed(0)
        config = FANformerConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size(), max_seq_len=64)
        save_checkpoint(float_dir, FANformer(config).eval(), tokenizer)
    if not (root / "gptq").is_dir():
        quantize_checkpoint(float_dir, RTNConfig(bits=4, group_size=32), root / "gptq", progress=False)
    if not (root / "nf4").is_dir():  # bitsandbytes' own tensors (packed 4-bit weights, absmax, quant_map)
        quantize_checkpoint(float_dir, BnbNF4Config(), root / "nf4", progress=False)
    if not (root / "int8").is_dir():  # LLM.int8(): int8 rows and their SCB scales
        quantize_checkpoint(float_dir, BnbInt8Config(), root / "int8", progress=False)
    if not (root / "ggml").is_dir():  # GPTQ on Q4_K's grid: llama.cpp blocks (rows of 64 fall back to Q5_0)
        model = load_model(float_dir)
        config = GPTQConfig(grid="q4_k_m", calib_samples=4)
        windows = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        report = quantize(model, config, windows, progress=False)
        save_quantized(root / "ggml", model, load_tokenizer(float_dir), config, report)
    if not (root / "gguf").is_dir():
        (root / "gguf").mkdir()
        export(float_dir, "gguf", root / "gguf" / "model.gguf", type="q8_0")
    if not (root / "onnx").is_dir():
        export(float_dir, "onnx", root / "onnx")
    return root
