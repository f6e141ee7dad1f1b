import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fanformer.config import PRESETS, FANformerConfig
from fanformer.model import CoLALinear, FANformer, FANLayer, apply_rope, count_parameters, rope_cos_sin


def tiny(**overrides) -> FANformerConfig:
    return FANformerConfig.from_name("tiny", **overrides)


def build(config: FANformerConfig, seed: int = 0) -> FANformer:
    torch.manual_seed(seed)
    return FANformer(config).eval()


# --- FAN layer -------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["identity", "gelu"])
def test_fan_layer_matches_formula(activation):
    config = tiny(fan_activation=activation)
    torch.manual_seed(0)
    layer = FANLayer(config)
    x = torch.randn(2, 5, config.d_model)
    W, b = layer.proj.weight, layer.proj.bias
    dp = config.d_periodic
    P = x @ W[:dp].T + b[:dp]
    G = x @ W[dp:].T + b[dp:]
    if activation == "gelu":
        G = 0.5 * G * (1 + torch.erf(G / math.sqrt(2)))
    expected = torch.cat([torch.cos(P), torch.sin(P), G], dim=-1)
    torch.testing.assert_close(layer(x), expected)
    assert expected.shape[-1] == config.d_model


def test_cola_linear_matches_formula():
    torch.manual_seed(0)
    layer = CoLALinear(16, 24, rank=4, bias=True)
    x = torch.randn(3, 16)
    h = x @ layer.lora_a.weight.T
    expected = (h * torch.sigmoid(h)) @ layer.lora_b.weight.T + layer.lora_b.bias
    torch.testing.assert_close(layer(x), expected)


# --- Parameter counts against an independent formula ---------------------------------

def linear_params(config, fan_in, fan_out, bias=False):
    r = config.cola_rank_for(fan_in)
    if r:
        return fan_in * r + r * fan_out + (fan_out if bias else 0)
    return fan_in * fan_out + (fan_out if bias else 0)


def expected_params(c: FANformerConfig) -> int:
    d, hq, hkv = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    total = c.vocab_size * d + d  # embedding, final norm
    for i in range(c.n_layers):
        fan = linear_params(c, d, c.d_periodic + c.d_plain, bias=True) if c.d_periodic else 0
        attn = linear_params(c, d, hq) + 2 * linear_params(c, d, hkv) + linear_params(c, hq, d)
        ffn = 2 * linear_params(c, d, c.ffn_dim) + linear_params(c, c.ffn_dim, d)
        norms = d  # ffn norm
        norms += d if (c.norm == "pre" or i == 0) else 3 * c.head_dim  # attention pre-norm or QKV-norm
        gates = 2 * d if c.gated_residual else 0
        total += fan + attn + ffn + norms + gates
    if not c.tie_embeddings:
        total += linear_params(c, d, c.vocab_size) if c.cola_lm_head else d * c.vocab_size
    return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    config = FANformerConfig.from_name(name)
    with torch.device("meta"):
        model = FANformer(config)
    assert count_parameters(model) == expected_params(config)


def test_seed_92m_is_near_the_cards_count():
    with torch.device("meta"):
        n = count_parameters(FANformer(FANformerConfig.from_name("seed-92m")))
    assert n == 93_310_428
    assert abs(n - 92.2e6) / 92.2e6 < 0.02


def test_p0_is_the_plain_transformer_of_the_same_shape():
    fan, plain = build(tiny(p=0.25)), build(tiny(p=0.0))
    assert not any("fan" in name for name, _ in plain.named_parameters())
    assert all(block.attn.fan is None for block in plain.blocks)
    fan_only = {n: p.numel() for n, p in fan.named_parameters() if ".fan." in n}
    assert count_parameters(fan) - count_parameters(plain) == sum(fan_only.values()) > 0
    # The plain model's attention sees the normed input directly: Q = norm(x) W_q.
    x = torch.randn(1, 4, 64)
    block = plain.blocks[0]
    q = block.attn.q_proj(block.attn_norm(x))
    captured = {}
    block.attn.q_proj.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    plain.blocks[0](x, *rope_cos_sin(torch.arange(4)[None], 16, 1e4), None)
    torch.testing.assert_close(captured["in"], block.attn_norm(x))
    assert q.shape == (1, 4, 64)


# --- Cached decode == uncached forward, for every option ---------------------------

COMBOS = list(itertools.product(["pre", "hybrid"], [0.0, 0.25], [(4, 2), (4, 4), (4, 1)], [0.0, 0.25]))


@pytest.mark.parametrize("norm,cola,heads,p", COMBOS)
def test_cached_decode_equals_uncached_forward(norm, cola, heads, p):
    config = tiny(norm=norm, cola_rank=cola, n_heads=heads[0], n_kv_heads=heads[1], p=p,
                  gated_residual=cola > 0, cola_lm_head=cola > 0)
    model = build(config)
    x = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        reference = model(x)  # uncached, causal
        cache = model.new_cache()
        steps = [model(x[:, :4], cache=cache), model(x[:, 4:7], cache=cache)]
        steps += [model(x[:, t:t + 1], cache=cache) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 11


def test_left_padding_does_not_change_a_prompts_logits():
    model = build(tiny(norm="hybrid"))
    short = torch.randint(3, 512, (1, 5))
    padded = torch.cat([torch.full((1, 3), 2), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(short)
        batched = model(padded, attention_mask=mask)
        cache = model.new_cache()
        model(padded, attention_mask=mask, cache=cache)
        nxt = torch.randint(3, 512, (1, 1))
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1), cache=cache)
        alone_next = model(torch.cat([short, nxt], 1))[:, -1:]
    torch.testing.assert_close(batched[:, 3:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step, alone_next, atol=1e-5, rtol=1e-4)


# --- HybridNorm placement and residual forms -------------------------------------

def test_hybrid_norm_placement():
    model = build(tiny(norm="hybrid", n_layers=3))
    first, rest = model.blocks[0], model.blocks[1:]
    assert first.attn_norm is not None and not first.attn.qkv_norm
    for block in rest:
        assert block.attn_norm is None and block.attn.qkv_norm
        assert block.attn.q_norm.weight.shape == (16,)  # per head, over head_dim
    assert all(b.post_norm_ffn for b in model.blocks)
    pre = build(tiny(norm="pre", n_layers=3))
    assert all(b.attn_norm is not None and not b.attn.qkv_norm and not b.post_norm_ffn for b in pre.blocks)


def _silence(block):
    """Zero both branch outputs so a block reduces to its residual/norm skeleton."""
    with torch.no_grad():
        block.attn.o_proj.weight.zero_()
        block.ffn.down_proj.weight.zero_()


def _rms_norm(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("norm", ["pre", "hybrid"])
def test_ffn_post_norm_takes_the_residual_after_the_norm(norm):
    model = build(tiny(norm=norm))
    block = model.blocks[1]
    _silence(block)
    x = 3 * torch.randn(1, 4, 64)
    out = block(x, *rope_cos_sin(torch.arange(4)[None], 16, 1e4), None)
    # hybrid: x -> x + 0 -> z = norm(x) -> z + 0; pre: x -> x + 0 -> x + 0.
    torch.testing.assert_close(out, _rms_norm(x) if norm == "hybrid" else x)


def test_gated_residual_scales_by_sigmoid_gate():
    model = build(tiny(gated_residual=True))
    block = model.blocks[0]
    cos_sin = rope_cos_sin(torch.arange(4)[None], 16, 1e4)
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        attn_out = block.attn(block.attn_norm(x), *cos_sin, None)
        block.ffn.down_proj.weight.zero_()
        torch.testing.assert_close(block(x, *cos_sin, None), x + 0.5 * attn_out)  # gate init 0 -> 1/2
        block.attn_gate.fill_(-1e4)
        torch.testing.assert_close(block(x, *cos_sin, None), x)


# --- RoPE -------------------------------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([[m]]), 16, 1e4)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), 16, 1e4)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))
    c, s = rope_cos_sin(torch.tensor([[5]]), 16, 1e4)
    torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm())


def test_tied_embeddings_share_one_tensor():
    model = build(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert count_parameters(model) == expected_params(tiny(tie_embeddings=True))


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.5))
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_logits_shape_and_loss_at_init():
    model = build(tiny())
    x = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (4, 32, 512)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    # Head std 1/sqrt(d) on a unit-RMS input gives logits ~ N(0, 1): E[loss] ~ ln V + 1/2.
    assert abs(loss.item() - (math.log(512) + 0.5)) < 0.25


# --- Training-memory options: the same loss and gradients as the plain path -----------

def loss_and_grads(model: FANformer, x, y, checkpoint_blocks: bool, loss_chunk: int):
    model.checkpoint_blocks, model.loss_chunk = checkpoint_blocks, loss_chunk
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks for every path
    loss, aux = model(x, targets=y)
    (loss + aux).backward()
    return loss.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [
    dict(tie_embeddings=True),
    dict(norm="hybrid", cola_rank=0.25, cola_lm_head=True, gated_residual=True, dropout=0.1),
    dict(head="fourier", vocab_size=64),
], ids=["tied", "seed-like-dropout", "fourier-head"])
@pytest.mark.parametrize("checkpoint_blocks, loss_chunk", [(True, 0), (False, 7), (True, 32)])
def test_block_checkpointing_and_chunked_loss_match_the_plain_path(overrides, checkpoint_blocks, loss_chunk):
    """The reference is the plain forward's logits through F.cross_entropy, as before the
    options existed; 7 does not divide the 2 x 24 positions, so the last chunk is short."""
    model = build(tiny(**overrides)).train()
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    logits, aux_ref = model(x, return_aux=True)
    loss_ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    (loss_ref + aux_ref).backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, aux, grads = loss_and_grads(model, x, y, checkpoint_blocks, loss_chunk)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref.detach(), rtol=1e-5, atol=1e-7)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads_ref.items() if "gate" not in n)  # every weight is exercised


def test_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    """The saved tensors of the chunked loss's graph hold no (positions, vocab) tensor."""
    model = build(tiny(vocab_size=4000)).train()
    model.loss_chunk = 8
    x = torch.randint(0, 4000, (2, 64))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(x, targets=x)
    assert max(sizes) <= max(8 * 4000, 2 * 64 * 192)  # a chunk of logits, or the FFN activations
    model.loss_chunk = 0
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, targets=x)
    assert max(sizes) >= 2 * 64 * 4000  # the plain path saves the whole (B, T, vocab) logits


@pytest.mark.parametrize("checkpoint_blocks, loss_chunk", [(False, 0), (True, 16)])
def test_training_forward_is_one_graph_for_torch_compile(checkpoint_blocks, loss_chunk):
    """No graph breaks: torch.compile sees the whole step, so inductor can fuse the FAN layer's
    cos/sin/concat and SwiGLU's silu(gate) * up into the matmuls' neighbours."""
    model = build(tiny()).train()
    model.checkpoint_blocks, model.loss_chunk = checkpoint_blocks, loss_chunk
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, targets=x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
