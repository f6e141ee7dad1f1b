"""Running every form of a FANformer: backends behind one interface, and the generation,
perplexity and drift code that works on any of them.

A backend is one module of this package named `*_backend.py` that registers itself
(`@register`); `load_backend` imports those modules on first use, so importing the runtime
loads no backend library.
"""

from fanformer.runtime.backend import Backend, BackendInfo, backends, detect_format, load_backend
from fanformer.runtime.drift import Drift, drift, fp16_reference
from fanformer.runtime.generation import Generation, GenerationConfig, generate, reference_greedy
from fanformer.runtime.perplexity import Perplexity, eval_tokens, perplexity

__all__ = ["backends", "Backend", "BackendInfo", "Drift", "Generation", "GenerationConfig", "Perplexity",
           "detect_format", "drift", "eval_tokens", "fp16_reference", "generate", "load_backend",
           "perplexity", "reference_greedy"]
