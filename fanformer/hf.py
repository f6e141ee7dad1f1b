"""transformers integration: `AutoConfig` / `AutoModelForCausalLM` classes for FANformer.

Importing this module registers them (`register()`; `import fanformer` alone does not, so
that it stays cheap), and then `AutoModelForCausalLM.from_pretrained(dir)` loads a
checkpoint directory without `trust_remote_code`: the code is this installed package,
never code read from the checkpoint. The wrapper holds the plain `FANformer` module as
`.model`; its KV cache is transformers' own `Cache`, which the model's attention
drives through the same `update(key, value, layer_idx)` call as `fanformer.model.KVCache`.

transformers 5.25 renamed the cache argument and output field from `past_key_values` to
`cache`; `forward` takes either name and returns the cache under the name the installed
version's output class declares, so `generate` and hand-written cache loops work on every
version `pyproject.toml` allows (tested on the oldest and the newest).
"""

from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

from fanformer.checkpoint import MODEL_TYPE
from fanformer.config import FANformerConfig
from fanformer.model import FANformer

# The output field that carries the cache: `cache` from transformers 5.25, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class FANformerHFConfig(PretrainedConfig):
    """transformers' view of a `FANformerConfig`: the same fields, plus its bookkeeping."""

    model_type = MODEL_TYPE
    # Names transformers' generic code (caches, generation) looks for.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "intermediate_size": "ffn_dim",
    }

    def __init__(self, **kwargs):
        # Validate through the one config dataclass; keep its defaults for missing fields.
        names = FANformerConfig.field_names()
        fan = FANformerConfig.from_dict({k: kwargs.pop(k) for k in names if k in kwargs})
        kwargs.setdefault("tie_word_embeddings", fan.tie_embeddings)
        kwargs.setdefault("architectures", [FANformerForCausalLM.__name__])
        for name, value in fan.to_dict().items():
            setattr(self, name, value)
        super().__init__(**kwargs)

    def to_fanformer(self) -> FANformerConfig:
        return FANformerConfig.from_dict({name: getattr(self, name) for name in FANformerConfig.field_names()})


class FANformerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FANformerHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _supports_cache_class = True

    def __init__(self, config: FANformerHFConfig):
        super().__init__(config)
        self.model = FANformer(config.to_fanformer())
        self.post_init()

    def _init_weights(self, module):
        # FANformer initialises itself in its constructor.
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None, labels=None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


def register() -> None:
    AutoConfig.register(MODEL_TYPE, FANformerHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(FANformerHFConfig, FANformerForCausalLM, exist_ok=True)


register()
