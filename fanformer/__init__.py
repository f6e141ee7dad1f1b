"""FANformer: train Fourier-attention language models and take them to the edge.

Importing the package loads nothing heavy: torch and transformers are imported by the
modules that need them, when they are used. The names below resolve on first access.
For transformers' Auto classes, `import fanformer.hf` registers FANformer with them, so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works without trust_remote_code.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {"FANformer": "fanformer.model", "KVCache": "fanformer.model", "FANformerConfig": "fanformer.config",
         "PRESETS": "fanformer.config", "FANformerError": "fanformer.errors"}

__all__ = ["FANformer", "FANformerConfig", "FANformerError", "KVCache", "PRESETS", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fanformer' has no attribute {name!r}")
