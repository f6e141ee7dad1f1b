"""Tests for fanformer.training and fanformer.pipeline: schedule, batches, weight decay
groups, learning on real text, exact resume, DDP equivalence and the metrics log."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fanformer.checkpoint import TRAINER_STATE_FILE, WEIGHTS_FILE
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer
from fanformer.pipeline import train_run
from fanformer.training import METRICS_FILE, TrainConfig, batch_starts, lr_at, param_groups

VOCAB, SEQ = 400, 64
MODEL = dict(vocab_size=VOCAB, max_seq_len=SEQ)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]


def run(out, corpus, cache_dir, **train) -> dict:
    return train_run(out, data=[str(corpus)], model_overrides=MODEL, train_overrides=train,
                     cache_dir=cache_dir, progress=False)


# --- Pure pieces --------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_to_floor():
    lr, warmup, total, ratio = 1e-3, 10, 50, 0.1
    cfg = TrainConfig(lr=lr, warmup_steps=warmup, max_steps=total, min_lr_ratio=ratio)
    floor = lr * ratio

    def expected(step):  # written out from the schedule's definition, not from lr_at
        if step < warmup:
            return lr * (step + 1) / warmup
        t = min(step - warmup, total - warmup) / (total - warmup)
        return floor + (lr - floor) * (1 + math.cos(math.pi * t)) / 2

    got = [lr_at(s, cfg) for s in range(total + 5)]
    assert got == pytest.approx([expected(s) for s in range(total + 5)], rel=1e-12)
    # Warmup is linear: equal increments of lr / warmup from lr / warmup.
    assert np.diff(got[:warmup]) == pytest.approx(np.full(warmup - 1, lr / warmup))
    # Peak exactly at the end of warmup; never above it.
    assert got[warmup - 1] == pytest.approx(lr) and got[warmup] == pytest.approx(lr)
    assert max(got) == pytest.approx(lr)
    # Cosine decays monotonically to the floor at max_steps and stays there.
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))
    assert got[total] == pytest.approx(floor) and got[-1] == pytest.approx(floor)
    assert got[(warmup + total) // 2] == pytest.approx((lr + floor) / 2)
    # No warmup: the first step already runs at the peak.
    assert lr_at(0, TrainConfig(lr=lr, warmup_steps=0, max_steps=total)) == pytest.approx(lr)


def test_batch_starts_are_a_pure_function_of_seed_and_step():
    n, seq, count = 10_000, 64, 32
    a = batch_starts(n, seq, count, seed=3, step=7)
    np.testing.assert_array_equal(a, batch_starts(n, seq, count, seed=3, step=7))
    assert not np.array_equal(a, batch_starts(n, seq, count, seed=3, step=8))
    assert not np.array_equal(a, batch_starts(n, seq, count, seed=4, step=7))
    assert a.shape == (count,) and a.min() >= 0 and a.max() + seq + 1 <= n
    with pytest.raises(FANformerError, match="fewer than one window"):
        batch_starts(seq, seq, count, seed=0, step=0)
    # Exactly one window of seq + 1 tokens: every start is 0.
    np.testing.assert_array_equal(batch_starts(seq + 1, seq, count, seed=0, step=0), np.zeros(count))


def test_param_groups_exempt_exactly_norms_biases_and_gates():
    config = FANformerConfig.from_name("tiny", gated_residual=True, cola_rank=0.25, norm="hybrid")
    model = FANformer(config)
    named = dict(model.named_parameters())
    no_decay_names = {n for n in named if n.endswith(("norm.weight", ".bias", "_gate"))}
    # The config must really produce all three kinds, or the test proves little.
    assert any(n.endswith(".bias") for n in no_decay_names)
    assert any(n.endswith("_gate") for n in no_decay_names)
    assert any(n.endswith("q_norm.weight") for n in no_decay_names)

    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in named.items()}
    assert {by_id[id(p)] for p in no_decay["params"]} == no_decay_names
    assert {by_id[id(p)] for p in decay["params"]} == set(named) - no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


# --- Training on real text ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, cache_dir, tmp_path_factory):
    """60 steps of a tiny model on real Python source; (out dir, returned metrics)."""
    out = tmp_path_factory.mktemp("run") / "ckpt"
    cfg = dict(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4, log_every=5)
    last = run(out, corpus, cache_dir, **cfg)
    return out, last, TrainConfig(**cfg)


def test_loss_falls_on_real_text(trained):
    out, last, _ = trained
    records = read_metrics(out)
    assert last == records[-1]
    first_loss, final_val = records[0]["loss"], last["val_loss"]
    assert final_val < math.log(VOCAB) - 1.0
    assert final_val < first_loss - 1.0
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals == sorted(vals, reverse=True)


def test_metrics_log_fields(trained):
    out, _, cfg = trained
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(cfg.log_every, cfg.max_steps + 1, cfg.log_every))
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tok_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * cfg.batch_size * SEQ
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
        assert r["tok_per_s"] > 0 and math.isfinite(r["loss"])
        at_eval = r["step"] % cfg.eval_every == 0
        assert ("val_loss" in r) == at_eval and ("val_ppl" in r) == at_eval
        if at_eval:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-4)
    state = json.loads((out / TRAINER_STATE_FILE).read_text())
    assert state["step"] == cfg.max_steps and state["tokens_seen"] == records[-1]["tokens"]


def test_resume_is_bitwise_exact(corpus, cache_dir, tmp_path):
    """Stopping at step 5 and resuming must give the very weights of an uninterrupted run:
    dropout makes the result depend on the restored RNG, accumulation on the data position."""
    model = dict(MODEL, dropout=0.1)
    cfg = dict(max_steps=12, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=3, eval_every=4,
               eval_batches=2, log_every=1, save_every=0)

    def go(out, resume=False, **extra):
        return train_run(out, data=[str(corpus)], resume=resume, model_overrides={} if resume else model,
                         train_overrides={} if resume else dict(cfg, **extra), cache_dir=cache_dir,
                         progress=False)

    a, b = tmp_path / "a", tmp_path / "b"
    go(a)
    go(b, stop_at=5)
    assert json.loads((b / TRAINER_STATE_FILE).read_text())["step"] == 5
    assert [r["step"] for r in read_metrics(b)] == [1, 2, 3, 4, 5]
    torch.manual_seed(1234)  # as a fresh process would be: only the restored RNG state may matter
    go(b, resume=True)
    assert json.loads((b / TRAINER_STATE_FILE).read_text())["step"] == 12

    wa, wb = load_file(str(a / WEIGHTS_FILE)), load_file(str(b / WEIGHTS_FILE))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    steps = [r["step"] for r in read_metrics(b)]
    assert steps == list(range(1, 13))
    # Same training records; B also evaluated at the step it stopped at, so val fields differ there.
    fields = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in fields] for r in read_metrics(b)] == [[r[k] for k in fields] for r in read_metrics(a)]


def test_ddp_matches_single_process(corpus, cache_dir, tmp_path):
    """2 gloo processes x batch 2 take the same steps as 1 process x batch 4."""
    common = ["train", "--data", str(corpus), "--cache-dir", str(cache_dir), "--vocab-size", str(VOCAB),
              "--max-seq-len", str(SEQ), "--max-steps", "5", "--lr", "1e-3", "--warmup-steps", "1",
              "--log-every", "1", "--eval-every", "0", "--eval-batches", "2", "--seed", "7", "--quiet"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(common + ["--out", str(single), "--batch-size", "4"]) == 0

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", FANFORMER_CACHE=str(cache_dir))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fanformer.cli", *common, "--out", str(ddp), "--batch-size", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ms, md = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in md] == [r["step"] for r in ms] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in md] == [r["tokens"] for r in ms]
    for rs, rd in zip(ms, md):
        assert rd["loss"] == pytest.approx(rs["loss"], rel=1e-5)
    ws, wd = load_file(str(single / WEIGHTS_FILE)), load_file(str(ddp / WEIGHTS_FILE))
    assert ws.keys() == wd.keys()
    # AdamW divides each gradient by its own running RMS, so an element whose gradient is
    # ~0 turns float rounding (different reduction order) into a visible step: allow a
    # few such elements up to 1e-4, and require all the rest to agree to 1e-5.
    off, total = 0, 0
    for key in ws:
        torch.testing.assert_close(wd[key], ws[key], atol=1e-4, rtol=0, msg=key)
        off += int(((wd[key] - ws[key]).abs() > 1e-5).sum())
        total += ws[key].numel()
    assert off <= total * 1e-4
    # The weights moved, so agreeing is not just two copies of the initialisation.
    torch.manual_seed(7)  # train_run seeds with --seed before building the model
    init = FANformer(FANformerConfig.from_name("tiny", **MODEL)).state_dict()
    assert torch.equal(init["embed.weight"], load_file(str(single / WEIGHTS_FILE))["embed.weight"]) is False
    assert (ws["embed.weight"] - init["embed.weight"]).abs().max() > 1e-3


# --- Memory options: block checkpointing, chunked loss, 8-bit AdamW -----------------

SHORT = dict(max_steps=4, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=2, log_every=1)


def test_memory_options_train_like_the_plain_path(corpus, cache_dir, tmp_path):
    """`--activation-checkpointing --loss-chunk` through the whole loop: the same losses and
    weights as the plain run (the gradients are equal to float rounding: test_model.py)."""
    plain, lean = tmp_path / "plain", tmp_path / "lean"
    run(plain, corpus, cache_dir, **SHORT)
    run(lean, corpus, cache_dir, **SHORT, activation_checkpointing=True, loss_chunk=24)
    mp, ml = read_metrics(plain), read_metrics(lean)
    assert [r["step"] for r in ml] == [1, 2, 3, 4]
    for rp, rl in zip(mp, ml):
        assert rl["loss"] == pytest.approx(rp["loss"], rel=1e-5, abs=1e-5)
    wp, wl = load_file(str(plain / WEIGHTS_FILE)), load_file(str(lean / WEIGHTS_FILE))
    for key in wp:
        torch.testing.assert_close(wl[key], wp[key], atol=1e-4, rtol=0, msg=key)


def test_adamw8bit_keeps_8bit_state_and_resumes_exactly(corpus, cache_dir, tmp_path):
    a, b, ref = tmp_path / "a", tmp_path / "b", tmp_path / "adamw"
    cfg = dict(SHORT, max_steps=6, optimizer="adamw8bit")

    def go(out, resume=False, **extra):
        return train_run(out, data=[str(corpus)], resume=resume, model_overrides={} if resume else MODEL,
                         train_overrides={} if resume else dict(cfg, **extra), cache_dir=cache_dir,
                         progress=False)

    go(a)
    go(b, stop_at=3)
    state = load_file(str(b / "training_state.safetensors"))
    moments = [v for k, v in state.items() if k.endswith(("state1", "state2"))]
    # The moments really are 8-bit, but for tensors under 4096 values (norms, biases): 32-bit there.
    in_8bit = sum(v.numel() for v in moments if v.dtype == torch.uint8)
    assert in_8bit > 0.9 * sum(v.numel() for v in moments)
    torch.manual_seed(1234)
    go(b, resume=True)
    wa, wb = load_file(str(a / WEIGHTS_FILE)), load_file(str(b / WEIGHTS_FILE))
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # Against torch's AdamW from the same start: the first step's loss is the same forward pass;
    # after it, 8-bit moments move the weights slightly differently, not a different way.
    run(ref, corpus, cache_dir, **dict(cfg, optimizer="adamw"))
    m8, m32 = read_metrics(a), read_metrics(ref)
    assert m8[0]["loss"] == m32[0]["loss"]
    assert [r["loss"] for r in m8] == pytest.approx([r["loss"] for r in m32], abs=0.05)
    w32 = load_file(str(ref / WEIGHTS_FILE))
    torch.manual_seed(0)  # train_run seeds with --seed before building the model
    init = FANformer(FANformerConfig.from_name("tiny", **MODEL)).state_dict()
    for key in ("embed.weight", "blocks.0.ffn.up_proj.weight"):  # both large enough for 8-bit state
        assert (wa[key] - w32[key]).norm() < 0.1 * (w32[key] - init[key]).norm(), key


def test_resume_with_another_optimizer_is_refused(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    run(out, corpus, cache_dir, **dict(SHORT, max_steps=1))
    with pytest.raises(FANformerError, match="resume with --optimizer adamw"):
        train_run(out, data=[str(corpus)], resume=True, train_overrides=dict(max_steps=2, optimizer="adamw8bit"),
                  cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer="sgd"), "optimizer must be one of adamw, adamw8bit"),
    (dict(loss_chunk=-1), "loss_chunk must be >= 0"),
])
def test_bad_train_configs(overrides, message):
    with pytest.raises(FANformerError, match=message):
        TrainConfig(**overrides)


def test_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    from fanformer.training import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(FANformerError, match="pip install 'bitsandbytes>=0.46'"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))


def test_cli_refuses_8bit_adamw_under_fsdp(cli_fails, tmp_path):
    cli_fails(["train", "--out", tmp_path / "run", "--fsdp", "--optimizer", "adamw8bit"],
              "use --optimizer adamw with --fsdp")
