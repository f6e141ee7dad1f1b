"""FANformer: train Fourier-attention language models and take them to the edge.

Importing the package registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works without trust_remote_code.
"""

from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, KVCache

__version__ = "0.1.0"

__all__ = ["FANformer", "FANformerConfig", "FANformerError", "KVCache", "PRESETS", "__version__"]


def _register_with_transformers() -> None:
    from fanformer.hf import register

    register()


_register_with_transformers()
