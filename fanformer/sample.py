"""A small KV-cached sampler for quick looks at a model (quickstart, training samples).

Full generation (top-p, stop strings, batches, streaming, every backend) is the
runtime's; this is the minimal loop: prefill once, then one token per step.
"""

from __future__ import annotations

import torch

from fanformer.model import FANformer


@torch.no_grad()
def sample_tokens(model: FANformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                  top_k: int = 50, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Continue `prompt_ids`; temperature 0 is greedy."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    for _ in range(min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))):
        logits = model(ids, cache=cache)[0, -1].float()  # (vocab,)
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if next_id == eos_id:
            break
        out.append(next_id)
        ids = torch.tensor([[next_id]], device=device)
    return out


def sample_text(model: FANformer, tokenizer, prompt: str, max_new_tokens: int = 100, **kwargs) -> str:
    from fanformer.tokenizer import special_token_ids

    eos = special_token_ids(tokenizer)["eos_token_id"]
    ids = sample_tokens(model, tokenizer.encode(prompt).ids, max_new_tokens, eos_id=eos, **kwargs)
    return prompt + tokenizer.decode(ids)
