"""onnxruntime-genai's own model builder on FANformer weights, for the ONNX speed comparison.

The builder only knows architectures it was written for, so it is given the model as what
it is when p = 0, pre-norm, no CoLA and no gated residuals: a Hugging Face Llama. `as_llama`
writes such a checkpoint as a transformers `LlamaForCausalLM` folder (checking its logits
against ours first), and `build` runs `onnxruntime_genai.models.builder.create_model` on it
offline, at the precision and accuracy level given.

    python benchmarks/genai_builder.py CHECKPOINT OUT [--precision int4] [--accuracy-level 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fanformer.checkpoint import load_model
from fanformer.errors import FANformerError
from fanformer.tokenizer import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, load_tokenizer, \
    special_token_ids

# Our parameter names -> transformers Llama's ({i} is the block).
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"blocks.{{i}}.attn.{p}.weight": f"model.layers.{{i}}.self_attn.{p}.weight"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"blocks.{{i}}.ffn.{p}.weight": f"model.layers.{{i}}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}


def as_llama(checkpoint: Path, out: Path) -> Path:
    """Write `checkpoint` (a plain-Llama FANformer) as a transformers Llama folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = load_model(checkpoint).eval()
    c = model.config
    if c.has_fan or c.norm != "pre" or c.cola_rank or c.cola_lm_head or c.gated_residual:
        raise FANformerError(f"{checkpoint} is not a plain Llama (needs p = 0, pre-norm, no CoLA, no gated residuals)")
    special = special_token_ids(load_tokenizer(checkpoint))
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_seq_len,
                         rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                         bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                         pad_token_id=special["pad_token_id"], torch_dtype="float32")
    llama = LlamaForCausalLM(config).eval()
    ours = model.state_dict()
    theirs = {}
    for key, value in ours.items():
        parts = key.split(".")
        template = ".".join("{i}" if p.isdigit() else p for p in parts)
        index = next((p for p in parts if p.isdigit()), None)
        theirs[LLAMA_NAMES[template].format(i=index)] = value
    if c.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    missing, unexpected = llama.load_state_dict(theirs, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise FANformerError(f"Llama conversion: missing {missing}, unexpected {unexpected}")
    ids = torch.randint(3, c.vocab_size, (1, 24))
    with torch.no_grad():
        difference = (llama(ids).logits - model(ids)).abs().max().item()
    if difference > 1e-3:
        raise FANformerError(f"the Llama conversion's logits differ from the checkpoint's by {difference:.3g}")
    llama.save_pretrained(out)
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out / name)
    return out


def build(checkpoint: Path, out: Path, precision: str = "int4", accuracy_level: int = 4) -> Path:
    """The builder's genai folder for `checkpoint`, with our config.json added (the
    benchmarks read the context length from it; genai does not read it)."""
    with tempfile.TemporaryDirectory() as scratch:
        hf = as_llama(checkpoint, Path(scratch) / "hf")
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(Path(scratch) / "cache")]
        if precision in ("int4", "int8"):
            command += ["--extra_options", f"accuracy_level={accuracy_level}"]
        done = subprocess.run(command, capture_output=True, text=True)  # it narrates every layer
        if done.returncode:
            raise FANformerError(f"onnxruntime-genai's builder failed:\n{done.stderr[-3000:]}")
    genai = json.loads((out / "genai_config.json").read_text())
    if not genai["search"].get("past_present_share_buffer"):
        raise FANformerError("the builder wrote past_present_share_buffer false; not its best configuration")
    shutil.copy(checkpoint / "config.json", out / "config.json")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32", "fp16"])
    parser.add_argument("--accuracy-level", type=int, default=4)
    args = parser.parse_args()
    print(build(args.checkpoint, args.out, args.precision, args.accuracy_level))


if __name__ == "__main__":
    main()
