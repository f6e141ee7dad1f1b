"""Every name of the exported ONNX decoder in one place: files, inputs and outputs.

The names are Hugging Face Optimum's for decoders with a KV cache, which
onnxruntime-genai's `decoder` model type also reads (as printf templates).
"""

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, used when the model is over 2 GB
GENAI_CONFIG_FILE = "genai_config.json"
OPSET = 21

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

# Dynamic axes.
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE = "batch_size", "sequence_length", "past_sequence_length", \
    "total_sequence_length"


def past_names(n_layers: int) -> list[str]:
    """[past.0.key, past.0.value, past.1.key, ...]: the order of the graph's KV inputs."""
    return [template % i for i in range(n_layers) for template in (PAST_KEY, PAST_VALUE)]


def present_names(n_layers: int) -> list[str]:
    return [template % i for i in range(n_layers) for template in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return [LOGITS, *present_names(n_layers)]
