"""GGUF export of a FANformer checkpoint: one self-contained file (weights, every
hyperparameter, the byte-level BPE tokenizer) for llama.cpp-style runtimes.

Format: GGUF v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), written
with gguf-py's `GGUFWriter` and quantized with `gguf.quants.quantize`, so every block
layout (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, BF16) is llama.cpp's own. All key and tensor
names come from export/gguf_format.py.

Two architectures:

- `fanformer` (default): every model option (FAN layer, HybridNorm, CoLA factors,
  gated residuals) under the project's keys and tensor names; read by
  runtime/gguf_backend.py. llama.cpp itself has no `fanformer` architecture.
- `llama`: a plain llama.cpp `llama` file, for a checkpoint that *is* a Llama: no FAN
  layer (p = 0, or d_model * p < 1), pre-norm, no CoLA, no gated residuals. The Q and
  K rows are permuted from the Hugging Face rotate-half RoPE layout the model uses to
  llama.cpp's interleaved (GPT-J style) layout, exactly as llama.cpp's
  convert_hf_to_gguf.py (`LlamaModel.permute`) does; tied embeddings leave out
  output.weight, and llama.cpp then reads token_embd for the LM head. Such a file
  should run with `llama-cli -m FILE -p "def "`; no llama.cpp binary is available
  where this project is tested, so that is checked by structure (names, keys, the
  permutation inverted in tests/export/test_gguf_export.py), not by running it.

Tensor types follow llama.cpp: every 1-D tensor (norms, biases, residual gates) is F32;
2-D weights take the requested type as llama-quantize places it: its mixture (the LM
head in Q6_K for every quantized type but q8_0; more for the K-quant _S/_M/_L variants,
quant/kquants.py), or the one type everywhere with `pure` (llama-quantize --pure). A q*
type needs rows (ne[0] = in_features) in whole blocks of 32, and a tensor whose rows are
not falls back to F16 (all five q* types share the block size 32, so no other q* type
would fit); K-quants fall back as llama.cpp's tensor_type_fallback does. The export
logs which tensors fell back.

K-quant and 4-bit i-quant types (q2_k ... q6_k, iq4_nl, iq4_xs) are quantized by ggml's
own code (quant/kquants.py). With an importance matrix
(`imatrix`, export/gguf_imatrix.py) every quantized tensor that has an entry is quantized
by ggml minimising the imatrix-weighted error, the legacy q* types included.

A quantized checkpoint (`fanformer quantize`: config.json's quantization_config, GPTQ
packed tensors) is carried over without quantizing again (export/gguf_carry.py): 4-bit
layers as Q4_0 (sym) or Q4_1 (asym), 8-bit ones as Q8_0, built from the checkpoint's
integers and scales when each block of 32 input columns lies in one group (any group
size that is a multiple of 32, or per channel), else re-quantized by gguf.quants with the
re-blocking error logged. `type` then applies to the tensors the checkpoint keeps in
float (embeddings, a float LM head, kept layers), and general.file_type names the
carried type (MOSTLY_Q4_0, MOSTLY_Q4_1 or MOSTLY_Q8_0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import (GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFWriter,
                  TokenType)
from gguf import quants

from fanformer.export import gguf_format as names
from fanformer.checkpoint import model_state_dict, read_quantization_config
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.outputs import write_file_atomically
from fanformer.quant import kquants
from fanformer.quant.checkpoint import load_any_model
from fanformer.quant.config import GGML_CHECKPOINT_FORMAT as GGML
from fanformer.quant.config import describe
from fanformer.quant.linear import GGMLLinear
from fanformer.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids

log = logging.getLogger(__name__)

ARCHS = (names.ARCH, names.LLAMA_ARCH)
QUANT_SIDE_TENSORS = (".qzeros", ".scales", ".g_idx")  # a quantized layer's other GPTQ tensors
PAD_TOKEN = "[PAD{}]"  # rows of the embedding beyond the tokenizer, named as llama.cpp's converter does


# --- Pure helpers -------------------------------------------------------------

def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Q or K rows (n_head * head_dim, in) from rotate-half RoPE pairs (i, i + hs/2) to
    llama.cpp's interleaved pairs (2i, 2i + 1): convert_hf_to_gguf.py's LlamaModel.permute."""
    out = weight.shape[0]
    return (weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def llama_blockers(config: FANformerConfig) -> list[str]:
    """The options that keep a checkpoint from being a plain llama.cpp `llama` model."""
    problems = []
    if config.has_fan:
        problems.append(f"p = {config.p} (a FAN layer; llama needs p = 0)")
    if config.norm != "pre":
        problems.append(f"norm = {config.norm!r} (llama is pre-norm)")
    if config.cola_rank:
        problems.append(f"cola_rank = {config.cola_rank} (CoLA low-rank layers)")
    if config.gated_residual:
        problems.append("gated_residual = true (residual gates)")
    return problems


def hyperparameters(config: FANformerConfig, arch: str) -> dict[str, tuple[str, object]]:
    """{key: (value kind, value)} under `arch`: llama.cpp's keys, plus the project's for fanformer."""
    values = {
        names.CONTEXT_LENGTH: ("uint32", config.max_seq_len),
        names.EMBEDDING_LENGTH: ("uint32", config.d_model),
        names.BLOCK_COUNT: ("uint32", config.n_layers),
        names.FEED_FORWARD_LENGTH: ("uint32", config.ffn_dim),
        names.HEAD_COUNT: ("uint32", config.n_heads),
        names.HEAD_COUNT_KV: ("uint32", config.n_kv_heads),
        names.KEY_LENGTH: ("uint32", config.head_dim),
        names.VALUE_LENGTH: ("uint32", config.head_dim),
        names.RMS_EPS: ("float32", config.norm_eps),
        names.ROPE_FREQ_BASE: ("float32", config.rope_theta),
        names.ROPE_DIMENSION_COUNT: ("uint32", config.head_dim),
        names.VOCAB_SIZE: ("uint32", config.vocab_size),
    }
    if arch == names.ARCH:
        values.update({
            # float64, unlike llama.cpp's float32 keys: a reader rebuilding the config must get
            # exactly the p and CoLA ratio that produced d_p and the ranks (0.35 is not a float32).
            names.FAN_PERIODIC_RATIO: ("float64", config.p),
            names.FAN_PERIODIC_LENGTH: ("uint32", config.d_periodic),
            names.FAN_ACTIVATION: ("string", config.fan_activation),
            names.NORM_SCHEME: ("string", config.norm),
            names.COLA_RANK_RATIO: ("float64", config.cola_rank),
            names.COLA_LM_HEAD: ("bool", config.cola_lm_head),
            names.GATED_RESIDUAL: ("bool", config.gated_residual),
            names.TIE_EMBEDDINGS: ("bool", config.tie_embeddings),
        })
    expected = names.FANFORMER_KEYS if arch == names.ARCH else names.LLAMA_KEYS
    assert set(values) == set(expected), "hyperparameters() and gguf_format's key lists disagree"
    return {key.format(arch=arch): value for key, value in values.items()}


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, their llama.cpp token types, merges as "a b") for `vocab_size` rows."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: token for token, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise FANformerError("the checkpoint's tokenizer.json has gaps in its token ids; re-train the tokenizer")
    if len(by_id) > vocab_size:
        raise FANformerError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embedding rows; "
                             "the checkpoint is mixed from two models")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(TokenType.CONTROL if t in SPECIAL_TOKENS else TokenType.NORMAL) for t in tokens]
    # Rows no token uses (a vocab padded for speed): named and typed as llama.cpp's converter does.
    padding = range(len(tokens), vocab_size)
    tokens += [PAD_TOKEN.format(i) for i in padding]
    types += [int(TokenType.UNUSED)] * len(padding)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores merges as pairs; older files as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


# --- Writing ------------------------------------------------------------------

def check_output_file(out: Path, force: bool) -> Path:
    """Refuse a folder, and an existing file without --force."""
    if out.is_dir():
        raise FANformerError(f"output path {out} is a folder; "
                             f"give a file name ending in {names.FILE_SUFFIX} with --out")
    if out.exists() and not force:
        raise FANformerError(f"output file {out} already exists; choose another --out, or pass --force to overwrite it")
    return out


def _add(writer: GGUFWriter, key: str, kind: str, value) -> None:
    adders = {"uint32": writer.add_uint32, "float32": writer.add_float32, "float64": writer.add_float64,
              "bool": writer.add_bool, "string": writer.add_string}
    adders[kind](key, value)


def export_gguf(checkpoint: str | Path, out: str | Path, type: str | None = None,
                arch: str = names.ARCH, imatrix: str | Path | None = None, gptq: bool = False,
                calib_data: list[str] | None = None, calib_samples: int = names.GPTQ_CALIB_SAMPLES,
                output_tensor_type: str | None = None, token_embedding_type: str | None = None, pure: bool = False,
                force: bool = False, progress: bool = True) -> Path:
    """Export `checkpoint` to the GGUF file `out` with 2-D weights in `type` (see
    gguf_format.WEIGHT_TYPES), as a `fanformer` or a plain `llama` model, quantized with the
    importance matrix file `imatrix` if given, or with `gptq` (quant/gptq_k.py) on
    `calib_samples` windows of `calib_data`, or else with the importance matrix measured on
    those windows when `calib_data` is given. `type` None: the default (f16), or the type a
    quantized checkpoint is carried into. `output_tensor_type` / `token_embedding_type` set
    those two tensors' types, as llama-quantize's flags of the same names (then its
    row-length fallback applies); `pure` puts every other 2-D weight in `type`'s base type, as
    llama-quantize --pure, instead of llama.cpp's mixture."""
    checkpoint, out = Path(checkpoint), Path(out)
    asked, type = type, type or names.DEFAULT_WEIGHT_TYPE
    if type not in names.WEIGHT_TYPES:
        raise FANformerError(f"unsupported GGUF type {type!r}; choose one of {', '.join(names.WEIGHT_TYPES)}")
    if arch not in ARCHS:
        raise FANformerError(f"unsupported GGUF architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    check_output_file(out, force)
    importance = {}
    if imatrix is not None:
        from fanformer.export.gguf_imatrix import read_imatrix

        importance = read_imatrix(imatrix)
    qconfig = read_quantization_config(checkpoint)
    model = load_any_model(checkpoint)
    config = model.config
    if calib_data and not gptq:  # an importance matrix measured here, as `fanformer imatrix` would
        if qconfig is not None:
            raise FANformerError(f"{checkpoint} is already quantized; an importance matrix is measured on the "
                                 "float checkpoint it came from")
        from fanformer.export.gguf_imatrix import importance_means, measure_importance

        stats, _ = measure_importance(checkpoint, model, calib_data, calib_samples,
                                      min(names.IMATRIX_CTX, config.max_seq_len), progress=progress)
        importance = importance_means(stats, config.tie_embeddings)
    if config.head != "linear" or config.mixer != "attention":
        raise FANformerError(f"{checkpoint} has head = {config.head!r} and mixer = {config.mixer!r}, but GGUF "
                             "(and llama.cpp) runs the linear head with attention only; export it with "
                             "--format onnx instead")
    if arch == names.LLAMA_ARCH and (blockers := llama_blockers(config)):
        raise FANformerError(f"{checkpoint} cannot be exported as a llama model: {'; '.join(blockers)}; "
                             "export it with --arch fanformer instead")
    tokenizer = load_tokenizer(checkpoint)
    special = special_token_ids(tokenizer)
    tokens, token_types, merges = vocabulary(tokenizer, config.vocab_size)
    weight_type, file_type = names.WEIGHT_TYPES[type]
    carried_type = None
    precomputed = {}  # GGUF name -> (type, bytes) already quantized (GPTQ)
    if gptq:
        if qconfig is not None:
            raise FANformerError(f"{checkpoint} is already quantized; --gptq quantizes the float checkpoint it came from")
        if type in names.FLOAT_TYPES:
            raise FANformerError(f"--gptq only applies to quantized types, not --type {type}")
        # The pass overwrites exactly the weights it returns; the writer takes those from it.
        precomputed = _gptq(checkpoint, model, type, calib_data, calib_samples, pure, progress)
    carried_as = names.carried_checkpoint_type(qconfig, asked)
    if qconfig is not None and carried_as is None:
        # GPTQ-layout integers into a K-quant: a K-quant block is an fp16 super-block scale
        # over 6-bit sub-block scales and mins, and a GPTQ group's fp16 scale and integer zero
        # are not of that form. llama.cpp blocks into another type: not the same numbers.
        # Either way the dequantized weights are quantized into `type` instead.
        from fanformer.quant.linear import dequantized_model

        model, _ = dequantized_model(model)
        why = (f"{qconfig.get('grid')} blocks are not {type}'s" if qconfig.get("checkpoint_format") == GGML
               else f"{type}'s blocks (6-bit sub-block scales and mins under an fp16 super-block scale) cannot "
                    f"hold its groups exactly")
        log.warning("%s holds %s weights and %s: quantizing its dequantized weights to %s instead%s", checkpoint,
                    describe(qconfig), why, type, "" if importance else " (an --imatrix weighs that rounding)")
        qconfig = None
    if qconfig is not None and qconfig.get("checkpoint_format") == GGML:
        type = carried_as  # the blocks are written as they are; the mixture places everything else
        weight_type, file_type = names.WEIGHT_TYPES[type]
        precomputed = {names.gguf_tensor_name(f"{name}.weight"): (layer.qtype, layer.qblocks.numpy())
                       for name, layer in model.named_modules() if isinstance(layer, GGMLLinear)}
        log.info("carrying %d tensors of llama.cpp blocks (%s) from %s", len(precomputed), type, checkpoint)
        if asked in names.FLOAT_TYPES:
            log.warning("%s holds %s blocks: they are written as they are, not as --type %s (export the float "
                        "checkpoint for that)", checkpoint, type, asked)
        qconfig = None
    if qconfig is not None:
        from fanformer.export import gguf_carry
        carried_type = gguf_carry.target_type(qconfig["bits"], bool(qconfig.get("sym", True)))
        file_type = gguf_carry.FILE_TYPES[carried_type]

    def write(tmp: Path) -> None:
        log.info("exporting %s to GGUF (%s, %s)", checkpoint, arch, type)
        writer = GGUFWriter(tmp, arch)  # writes general.architecture itself
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    def fill(writer: GGUFWriter) -> None:
        writer.add_string(names.GENERAL_NAME, checkpoint.name)
        writer.add_uint32(names.GENERAL_FILE_TYPE, int(file_type))
        writer.add_uint32(names.GENERAL_QUANTIZATION_VERSION, GGML_QUANT_VERSION)
        writer.add_custom_alignment(GGUF_DEFAULT_ALIGNMENT)  # general.alignment, stated explicitly
        for key, (kind, value) in hyperparameters(config, arch).items():
            _add(writer, key, kind, value)
        writer.add_string(names.TOKENIZER_MODEL, names.TOKENIZER_MODEL_GPT2)
        writer.add_string(names.TOKENIZER_PRE, names.TOKENIZER_PRE_GPT2)
        writer.add_array(names.TOKENIZER_TOKENS, tokens)
        writer.add_array(names.TOKENIZER_TOKEN_TYPE, token_types)
        writer.add_array(names.TOKENIZER_MERGES, merges)
        writer.add_uint32(names.TOKENIZER_BOS_ID, special["bos_token_id"])
        writer.add_uint32(names.TOKENIZER_EOS_ID, special["eos_token_id"])
        writer.add_uint32(names.TOKENIZER_PAD_ID, special["pad_token_id"])
        # The project never inserts BOS/EOS behind the caller's back (fanformer/tokenizer.py).
        writer.add_bool(names.TOKENIZER_ADD_BOS, False)
        writer.add_bool(names.TOKENIZER_ADD_EOS, False)

        fell_back, imatrix_used, unweighted = [], [], []
        carried = {}
        mixture = type in kquants.MIXTURES or type in names.LEGACY_TYPES
        for key, tensor in model_state_dict(model).items():  # the tied LM head is left out
            if key.endswith(QUANT_SIDE_TENSORS):
                continue  # written with the layer's .qweight
            if key.endswith(".qweight"):
                key = key[: -len(".qweight")] + ".weight"
                result = gguf_carry.carry_layer(model.get_submodule(key.rsplit(".", 1)[0]), carried_type)
                carried[names.gguf_tensor_name(key)] = result
                array = result.data  # rows are output channels, so the llama permutation applies as is
                if arch == names.LLAMA_ARCH and key.endswith("attn.q_proj.weight"):
                    array = llama_permute(array, config.n_heads)
                elif arch == names.LLAMA_ARCH and key.endswith("attn.k_proj.weight"):
                    array = llama_permute(array, config.n_kv_heads)
                writer.add_tensor(names.gguf_tensor_name(key), np.ascontiguousarray(array), raw_dtype=result.qtype)
                continue
            if key.endswith(".qblocks"):  # a GGMLLinear's blocks: in `precomputed`
                key = key[: -len(".qblocks")] + ".weight"
            name = names.gguf_tensor_name(key)
            if name in precomputed:
                qtype, data = precomputed[name]
                if arch == names.LLAMA_ARCH and key.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
                    data = llama_permute(data, config.n_heads if "q_proj" in key else config.n_kv_heads)
                writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
                continue
            array = tensor.to(torch.float32).numpy()
            if arch == names.LLAMA_ARCH and key.endswith("attn.q_proj.weight"):
                array = llama_permute(array, config.n_heads)
            elif arch == names.LLAMA_ARCH and key.endswith("attn.k_proj.weight"):
                array = llama_permute(array, config.n_kv_heads)
            chosen = {"output.weight": output_tensor_type, "token_embd.weight": token_embedding_type}.get(name)
            if array.ndim < 2:
                qtype = names.SMALL_TENSOR_TYPE
            else:
                if chosen is not None:  # --output-tensor-type / --token-embedding-type
                    wanted = GGMLQuantizationType[chosen.upper()]
                elif mixture:
                    wanted = kquants.mixture_type(name, type, config.n_layers, config.n_heads // config.n_kv_heads,
                                                  config.tie_embeddings, bool(importance), pure)
                else:  # a float type: every row length fits
                    wanted = weight_type
                qtype = kquants.fallback_type(wanted, array.shape[-1])  # llama.cpp's, F16 last
                if qtype != wanted:
                    fell_back.append(f"{name} ({wanted.name.lower()} -> {qtype.name.lower()})")
            weights = importance.get(name) if qtype not in names.FLOAT_GGML_TYPES else None
            if weights is not None:
                imatrix_used.append(name)
            elif qtype not in names.FLOAT_GGML_TYPES:
                unweighted.append(name)
            if qtype in names.FLOAT_GGML_TYPES or (weights is None and qtype in kquants.REFERENCE_TYPES):
                data = quants.quantize(np.ascontiguousarray(array), qtype)  # gguf-py: the reference bytes
            else:
                data = kquants.quantize(array.reshape(-1, array.shape[-1]), qtype, weights)
            writer.add_tensor(name, data, raw_dtype=qtype)
        if fell_back:
            log.warning("%d tensor(s) in another type, their row length not a multiple of the type's block "
                        "(as llama.cpp falls back): %s", len(fell_back), ", ".join(fell_back))
        if importance:
            log.info("importance matrix applied to %d tensors%s", len(imatrix_used),
                     f"; it has no entry for {', '.join(unweighted)}" if unweighted else "")
        if qconfig is not None:
            gguf_carry.log_report(carried, qconfig)

    return write_file_atomically(out, write)


def _gptq(checkpoint: Path, model, type: str, calib_data: list[str] | None, calib_samples: int, pure: bool,
          progress: bool) -> dict:
    """quant/gptq_k.py's tensors for `model`, calibrated on `calib_data`'s training split."""
    from fanformer.quant.gptq_k import gptq_tensors
    from fanformer.quant.calibration import calibration_tokens
    from fanformer.quant.config import GPTQConfig

    config = GPTQConfig(bits=4, calib_samples=calib_samples).for_model(model.config.max_seq_len)
    if names.WEIGHT_TYPES[type][0] != GGMLQuantizationType.Q4_K:
        log.warning("GPTQ runs on Q4_K's grid only (q4_k_s, q4_k_m); the %s tensors are quantized with each "
                    "layer's Hessian diagonal as their importance matrix instead, block by block", type)
    windows = calibration_tokens(load_tokenizer(checkpoint), calib_data, config.calib_samples, config.calib_seq_len)
    written = gptq_tensors(model, type, windows, config, pure=pure, progress=progress)
    return {names.gguf_tensor_name(f"{name}.weight"): (qtype, data) for name, (qtype, data, _) in written.items()}
