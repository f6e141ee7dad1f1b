"""Drift of a model against a reference on identical tokens and windows.

Besides both perplexities, the measures of llama.cpp's `llama-perplexity --kl-divergence`:
the KL divergence KL(P_ref || P_model) of the next-token distributions at every scored
position (mean, with its standard error, and 99th percentile) and the top-1 agreement
rate ("same top p": how often both put the same token first).

The default reference of a full-precision checkpoint is its FP16 reference: the same
weights rounded to fp16, computed in fp32 on a CPU (where fp16 matmuls are slow and not
what a deployment runs) and in fp16 on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fanformer.errors import FANformerError
from fanformer.runtime.backend import Backend, load_backend
from fanformer.runtime.perplexity import Perplexity, check_ctx, make_windows, scored_log_probs, summarize_nll


@dataclass
class Drift:
    model: Perplexity
    reference: Perplexity
    ppl_change: float  # ppl_model / ppl_reference - 1
    kl_mean: float
    kl_stderr: float
    kl_p99: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def fp16_reference(path, device: str = "cpu") -> Backend:
    """The checkpoint's weights rounded to fp16; fp32 compute on a CPU, fp16 on a GPU."""
    dtype = "fp16" if device.startswith("cuda") else "fp32"
    return load_backend(path, format="pytorch", dtype=dtype, device=device, round_weights="fp16")


def check_same_vocabulary(model: Backend, reference: Backend) -> None:
    probe = "def f(x):\n    return x  # Fourier période π 🙂"
    if (model.info.vocab_size != reference.info.vocab_size
            or model.tokenizer.encode(probe).ids != reference.tokenizer.encode(probe).ids):
        raise FANformerError("the model and the reference use different tokenizers or vocabularies, "
                             "so their next-token distributions cannot be compared")


def drift(model: Backend, reference: Backend, tokens: np.ndarray, protocol: str = "sliding", ctx: int = 512,
          stride: int | None = None, batch_size: int = 4, progress: bool = False) -> Drift:
    check_same_vocabulary(model, reference)
    check_ctx(model, ctx)
    check_ctx(reference, ctx)
    stride = stride or ctx // 2
    windows = make_windows(len(tokens), protocol, ctx, stride)
    nll, ref_nll, kl, agree = [], [], [], []
    pairs = zip(scored_log_probs(model, tokens, windows, batch_size, progress, desc="model"),
                scored_log_probs(reference, tokens, windows, batch_size, desc="reference"))
    for (lp, targets), (ref_lp, _) in pairs:
        nll.append(-lp.gather(-1, targets[:, None])[:, 0])
        ref_nll.append(-ref_lp.gather(-1, targets[:, None])[:, 0])
        # KL(P_ref || P): sum_v p_ref (log p_ref - log p); clamp -inf log-probs of tokens a
        # quantized model rules out, so the sum stays finite where p_ref is tiny too, and
        # take 0 log 0 = 0 where the reference rules a token out (else 0 * -inf = nan).
        ref_p = ref_lp.exp()
        kl.append(torch.where(ref_p > 0, ref_p * (ref_lp - lp.clamp(min=-1e4)), 0.0).sum(-1).clamp(min=0))
        agree.append(lp.argmax(-1) == ref_lp.argmax(-1))
    kl_all = torch.cat(kl).double().numpy()
    n = len(kl_all)
    model_ppl = summarize_nll(torch.cat(nll).numpy(), protocol, ctx, stride)
    ref_ppl = summarize_nll(torch.cat(ref_nll).numpy(), protocol, ctx, stride)
    return Drift(model=model_ppl, reference=ref_ppl, ppl_change=model_ppl.ppl / ref_ppl.ppl - 1,
                 kl_mean=float(kl_all.mean()),
                 kl_stderr=float(kl_all.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
                 kl_p99=float(np.percentile(kl_all, 99)),
                 top1_agreement=float(torch.cat(agree).double().mean()), tokens=n)
