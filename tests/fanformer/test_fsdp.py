"""Tests for fanformer.fsdp: `torchrun ... train --fsdp` on 2 CPU processes (gloo) against
one process on the same global batch, and a stopped-and-resumed sharded run against an
uninterrupted one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fanformer.checkpoint import SHARDED_DIR, TRAINER_STATE_FILE, WEIGHTS_FILE, load_model
from fanformer.cli import main
from fanformer.errors import FANformerError
from fanformer.pipeline import train_run
from fanformer.training import METRICS_FILE, TrainConfig

VOCAB, SEQ = 400, 64
FIELDS = ("step", "loss", "lr", "grad_norm", "tokens")


def read_metrics(out):
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]


def torchrun(args, cache_dir, processes: int = 2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", FANFORMER_CACHE=str(cache_dir))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "fanformer.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_exactly(corpus, cache_dir, tmp_path):
    """2 processes x batch 2 under --fsdp (with block checkpointing and the chunked loss, as a
    large model would train) take the steps of 1 process x batch 4; stopping at step 3 (after a
    mid-run sharded save at step 2) and resuming ends with the uninterrupted run's weights."""
    common = ["train", "--data", str(corpus), "--cache-dir", str(cache_dir), "--vocab-size", str(VOCAB),
              "--max-seq-len", str(SEQ), "--max-steps", "5", "--lr", "1e-3", "--warmup-steps", "1",
              "--log-every", "1", "--eval-every", "0", "--eval-batches", "2", "--seed", "7", "--quiet"]
    fsdp = ["--batch-size", "2", "--fsdp", "--activation-checkpointing", "--loss-chunk", "40"]
    single, whole, split = tmp_path / "single", tmp_path / "fsdp", tmp_path / "fsdp-resumed"
    assert main(common + ["--out", str(single), "--batch-size", "4"]) == 0
    torchrun(common + fsdp + ["--out", str(whole)], cache_dir)

    # The loss curve of one process on the same global batch.
    ms, mf = read_metrics(single), read_metrics(whole)
    assert [r["step"] for r in mf] == [r["step"] for r in ms] == [1, 2, 3, 4, 5]
    assert [r["tokens"] for r in mf] == [r["tokens"] for r in ms]
    for rs, rf in zip(ms, mf):
        assert rf["loss"] == pytest.approx(rs["loss"], rel=1e-5)
        assert rf["grad_norm"] == pytest.approx(rs["grad_norm"], rel=1e-5)
    # Shards of both ranks, and the usual single-file checkpoint gathered from them at the end.
    assert len(list((whole / SHARDED_DIR).glob("*.distcp"))) == 2
    ws, wf = load_file(str(single / WEIGHTS_FILE)), load_file(str(whole / WEIGHTS_FILE))
    assert ws.keys() == wf.keys()
    for key in ws:  # the DDP test's bound: AdamW turns reduction-order rounding into <= 1e-4
        torch.testing.assert_close(wf[key], ws[key], atol=1e-4, rtol=0, msg=key)
    assert load_model(whole).config.vocab_size == VOCAB

    torchrun(common + fsdp + ["--out", str(split), "--stop-at", "3", "--save-every", "2"], cache_dir)
    assert json.loads((split / TRAINER_STATE_FILE).read_text())["step"] == 3
    torchrun(["train", "--out", str(split), "--resume", "--quiet", "--cache-dir", str(cache_dir)], cache_dir)
    assert json.loads((split / TRAINER_STATE_FILE).read_text())["step"] == 5
    wr = load_file(str(split / WEIGHTS_FILE))
    for key in wf:
        assert torch.equal(wr[key], wf[key]), key
    assert [[r[k] for k in FIELDS] for r in read_metrics(split)] == [[r[k] for k in FIELDS] for r in mf]


@pytest.mark.slow
def test_fsdp_resumes_on_another_process_count(corpus, cache_dir, tmp_path):
    """A run sharded over 2 processes x batch 2, stopped at step 3, resumes on 4 processes x
    batch 1 (the same global batch): DCP reshards weights and AdamW state on load, and the
    run ends where the uninterrupted 2-process run ends."""
    common = ["train", "--data", str(corpus), "--cache-dir", str(cache_dir), "--vocab-size", str(VOCAB),
              "--max-seq-len", str(SEQ), "--max-steps", "5", "--lr", "1e-3", "--warmup-steps", "1",
              "--log-every", "1", "--eval-every", "0", "--eval-batches", "2", "--seed", "7", "--quiet", "--fsdp"]
    whole, split = tmp_path / "fsdp", tmp_path / "fsdp-4"
    torchrun(common + ["--batch-size", "2", "--out", str(whole)], cache_dir)
    torchrun(common + ["--batch-size", "2", "--out", str(split), "--stop-at", "3"], cache_dir)
    torchrun(["train", "--out", str(split), "--resume", "--batch-size", "1", "--quiet", "--cache-dir",
              str(cache_dir)], cache_dir, processes=4)
    assert len(list((split / SHARDED_DIR).glob("*.distcp"))) == 4  # saved again by 4 processes
    mw, ms = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in ms] == [1, 2, 3, 4, 5] and [r["tokens"] for r in ms] == [r["tokens"] for r in mw]
    for rw, rs in zip(mw, ms):
        assert rs["loss"] == pytest.approx(rw["loss"], rel=1e-5)
        assert rs["grad_norm"] == pytest.approx(rw["grad_norm"], rel=1e-5)
    ww, ws = load_file(str(whole / WEIGHTS_FILE)), load_file(str(split / WEIGHTS_FILE))
    for key in ww:  # only the reduction order differs: the DDP test's bound
        torch.testing.assert_close(ws[key], ww[key], atol=1e-4, rtol=0, msg=key)


def test_fsdp_needs_torchrun(corpus, cache_dir, tmp_path):
    with pytest.raises(FANformerError, match="torchrun --nproc_per_node N"):
        train_run(tmp_path / "run", data=[str(corpus)], model_overrides=dict(vocab_size=VOCAB, max_seq_len=SEQ),
                  train_overrides=dict(max_steps=1, fsdp=True), cache_dir=cache_dir, progress=False)


def test_fsdp_resume_of_a_whole_checkpoint_is_refused(corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    train_run(out, data=[str(corpus)], model_overrides=dict(vocab_size=VOCAB, max_seq_len=SEQ),
              train_overrides=dict(max_steps=1, batch_size=2, eval_every=0, eval_batches=1), cache_dir=cache_dir,
              progress=False)
    with pytest.raises(FANformerError, match="trained without --fsdp .* resume it without --fsdp"):
        train_run(out, data=[str(corpus)], resume=True, train_overrides=dict(max_steps=2, fsdp=True),
                  cache_dir=cache_dir, progress=False)


def test_fsdp_with_8bit_adamw_is_a_config_error():
    with pytest.raises(FANformerError, match="use --optimizer adamw with --fsdp"):
        TrainConfig(fsdp=True, optimizer="adamw8bit")


def test_mixed_precision_is_bf16_compute_fp32_reduction_on_cuda_only():
    from fanformer.fsdp import mixed_precision

    cuda = mixed_precision(torch.device("cuda"))
    assert cuda.param_dtype == torch.bfloat16 and cuda.reduce_dtype == torch.float32
    cpu = mixed_precision(torch.device("cpu"))
    assert cpu.param_dtype is None and cpu.reduce_dtype is None
