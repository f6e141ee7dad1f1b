"""The ONNX and onnxruntime-genai backends' defences against a damaged export folder.

config.json, model.onnx and genai_config.json describe the same model three times; a
folder where they disagree makes onnxruntime fail mid-run or onnxruntime-genai allocate
for a vocabulary of 2^31 entries. Each file is checked against the others before a
session or generator is made, and every call into either runtime goes through `ort_run` /
`genai_call`, so what they raise reaches the user as one FANformerError naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.export import onnx_format as names
from fanformer.validate import check_context_fits, foreign_errors, read_json


def ort_run(model_file: Path, call, *args):
    """`session.run(...)` or `session.run_with_iobinding(...)`, with onnxruntime's errors (a
    graph that loads but cannot run) as one error."""
    with foreign_errors(f"onnxruntime failed to run {model_file}; the file is corrupted or not a FANformer "
                        "export: export it again"):
        return call(*args)


def genai_call(folder: Path, call, *args):
    """One onnxruntime-genai call (Generator, append_tokens, get_output, ...) on `folder`'s model."""
    with foreign_errors(f"onnxruntime-genai failed on {folder}; export the checkpoint again with "
                        "`fanformer export --format onnx`"):
        return call(*args)


def check_onnx_session(session, config: FANformerConfig, model_file: Path) -> None:
    """The graph's inputs and outputs against config.json: one key and one value input per
    layer, and static KV and logits widths that match, before any list or cache of the
    config's size is built."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past = [name for name in inputs if name.startswith("past_key_values.")]
    if not past or names.LOGITS not in outputs:
        raise FANformerError(f"{model_file} has no past_key_values inputs or no {names.LOGITS} output: "
                             "it is not a FANformer export")
    if len(past) != 2 * config.n_layers:
        raise FANformerError(f"{model_file} has {len(past)} past_key_values inputs, but config.json's n_layers "
                             f"{config.n_layers} calls for {2 * config.n_layers}; the folder mixes two models")
    weights = model_file.stat().st_size + sum(f.stat().st_size for f in [model_file.with_name(names.DATA_FILE)]
                                              if f.is_file())
    config.check_sizes(weights, model_file.with_name("config.json"))  # before lists of n_layers names
    expected = set(names.input_names(config.n_layers))
    # The fused graph rotates by cache slot and takes no position_ids.
    if set(inputs) not in (expected, expected - {names.POSITION_IDS}) or names.LOGITS not in outputs:
        odd = sorted(set(inputs) ^ expected)[:3] or [names.LOGITS]
        raise FANformerError(f"{model_file}: its inputs and outputs are not a FANformer export's ({', '.join(odd)})")
    checks = [(inputs[names.PAST_KEY % 0].shape, 1, config.n_kv_heads, "n_kv_heads"),
              (inputs[names.PAST_KEY % 0].shape, 3, config.head_dim, "head_dim"),
              (outputs[names.LOGITS].shape, 2, config.vocab_size, "vocab_size")]
    for shape, axis, value, field in checks:
        if len(shape) <= axis:
            raise FANformerError(f"{model_file}: an input or output has shape {shape}, not a FANformer export's")
        if isinstance(shape[axis], int) and shape[axis] != value:
            raise FANformerError(f"{model_file} is built for {field} {shape[axis]}, config.json says {value}; "
                                 "the folder mixes two models")


# genai_config.json's model section -> the config field (or tokenizer id) it must equal.
_GENAI_MODEL = {"vocab_size": "vocab_size", "context_length": "max_seq_len"}
_GENAI_DECODER = {"head_size": "head_dim", "hidden_size": "d_model", "num_attention_heads": "n_heads",
                  "num_key_value_heads": "n_kv_heads", "num_hidden_layers": "n_layers"}
_GENAI_NAMES = {"inputs": {"input_ids": names.INPUT_IDS, "attention_mask": names.ATTENTION_MASK,
                           "position_ids": names.POSITION_IDS, "past_key_names": names.PAST_KEY,
                           "past_value_names": names.PAST_VALUE},
                "outputs": {"logits": names.LOGITS, "present_key_names": names.PRESENT_KEY,
                            "present_value_names": names.PRESENT_VALUE}}
# search options genai reads, with the range each may take (max_length: up to the context).
_GENAI_SEARCH = {"num_beams": (1, 1), "num_return_sequences": (1, 1), "min_length": (0, None),
                 "top_k": (0, None), "no_repeat_ngram_size": (0, None)}
_GENAI_SEARCH_FLOATS = {"temperature": (0.0, None), "top_p": (0.0, 1.0), "repetition_penalty": (0.0, None),
                        "length_penalty": (None, None), "diversity_penalty": (None, None)}


def check_genai_config(folder: Path, config: FANformerConfig, special: dict[str, int]) -> None:
    """genai_config.json against config.json and the tokenizer: the sizes genai allocates
    from (vocab_size, context_length, heads, layers) must be the model's, the graph names
    the export's, and the search options in range."""
    file = folder / names.GENAI_CONFIG_FILE
    data = read_json(file)
    model, search = data.get("model"), data.get("search", {})
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict) or not isinstance(search, dict):
        raise FANformerError(f"{file}: expected a \"model\" object with a \"decoder\" and a \"search\" object")
    expected = [(model, key, getattr(config, field), f"model.{key}") for key, field in _GENAI_MODEL.items()]
    expected += [(decoder, key, getattr(config, field), f"model.decoder.{key}") for key, field in _GENAI_DECODER.items()]
    expected += [(model, key, special[key], f"model.{key}") for key in ("bos_token_id", "eos_token_id", "pad_token_id")]
    expected += [(decoder, "filename", names.MODEL_FILE, "model.decoder.filename")]
    for section, key, value in [(decoder.get(s), k, v) for s, keys in _GENAI_NAMES.items() for k, v in keys.items()]:
        expected.append((section if isinstance(section, dict) else {}, key, value, f"model.decoder.{key}"))
    for section, key, value, where in expected:
        found = section.get(key)
        if key == "position_ids" and found is None:  # the fused graph's inputs: it takes none
            continue
        if found != value or type(found) is not type(value):
            raise FANformerError(f"{file}: {where} is {found!r}, but the model's config.json and tokenizer give "
                                 f"{value!r}; the folder is damaged or mixes two models")
    for key, (low, high) in [*_GENAI_SEARCH.items(), *_GENAI_SEARCH_FLOATS.items()]:
        if key not in search:
            continue
        value, floats = search[key], key in _GENAI_SEARCH_FLOATS
        kind_ok = isinstance(value, (int, float) if floats else int) and not isinstance(value, bool)
        if not kind_ok or not math.isfinite(value) or (low is not None and value < low) or \
                (high is not None and value > high):
            raise FANformerError(f"{file}: search.{key} is {value!r}; expected a finite "
                                 f"{'number' if floats else 'integer'}"
                                 f"{f' >= {low}' if low is not None else ''}{f' <= {high}' if high is not None else ''}")
    max_length = search.get("max_length", config.max_seq_len)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= config.max_seq_len:
        raise FANformerError(f"{file}: search.max_length is {max_length!r}; expected an integer in "
                             f"1..{config.max_seq_len} (context_length)")
    for key in ("do_sample", "early_stopping", "past_present_share_buffer"):
        if key in search and not isinstance(search[key], bool):
            raise FANformerError(f"{file}: search.{key} is {search[key]!r}; expected true or false")
    check_context_fits(config.n_layers, config.n_kv_heads, config.head_dim, config.max_seq_len, 4, file,
                       "model.context_length")
