"""Running every form of a FANformer: backends behind one interface, and the generation,
perplexity and drift code that works on any of them.

A backend module registers itself on import; importing it here makes it available to
`load_backend`. A new format is one new module and one line below.
"""

from runtime import gguf_backend, genai_backend, onnx_backend, torch_backend  # noqa: F401  (they register themselves)
from runtime.backend import BACKENDS, Backend, BackendInfo, detect_format, load_backend
from runtime.drift import Drift, drift, fp16_reference
from runtime.generation import Generation, GenerationConfig, generate, reference_greedy
from runtime.perplexity import Perplexity, eval_tokens, perplexity

__all__ = ["BACKENDS", "Backend", "BackendInfo", "Drift", "Generation", "GenerationConfig", "Perplexity",
           "detect_format", "drift", "eval_tokens", "fp16_reference", "generate", "load_backend",
           "perplexity", "reference_greedy"]
