"""Training: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast on CUDA, DDP.

Memory options, none of which changes the loss or gradients (tested against the plain
path): per-block activation checkpointing and a chunked LM-head cross-entropy (both in
fanformer/model.py), and bitsandbytes' 8-bit AdamW, whose state resumes exactly.

Batches are a pure function of (seed, step, rank, micro-step): random windows of the
training tokens drawn from a generator seeded by the step. The data position is
therefore just the step, resuming is exact, and a torchrun job of N processes sees
the same global batch as one process with N times the micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from fanformer.checkpoint import save_checkpoint
from fanformer.config import knob
from fanformer.errors import FANformerError
from fanformer.model import FANformer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    max_steps: int = knob(1000, "optimizer steps in the whole run (the schedule's length)")
    batch_size: int = knob(8, "sequences per micro-batch per process")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    seq_len: int = knob(0, "training sequence length; 0 = the model's max_seq_len")
    lr: float = 3e-4
    min_lr_ratio: float = knob(0.1, "the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = knob(200, "validation every N steps; 0 = only at the end")
    eval_batches: int = knob(20, "validation batches per evaluation")
    save_every: int = knob(500, "checkpoint every N steps; 0 = only at the end")
    log_every: int = 10
    seed: int = 0
    compile: bool = knob(False, "torch.compile the model")
    activation_checkpointing: bool = knob(False, "keep only each block's input and recompute the block in "
                                          "backward: activations of one block instead of all (~1/3 more compute)")
    loss_chunk: int = knob(0, "compute the LM head and cross-entropy this many positions at a time, recomputed "
                           "in backward, so the (batch, seq, vocab) logits never exist whole; 0 = all at once")
    optimizer: str = knob("adamw", "adamw, or adamw8bit: bitsandbytes' block-wise 8-bit AdamW "
                          "(arXiv 2110.02861), 2 bytes of optimizer state per parameter instead of 8")
    fsdp: bool = knob(False, "under torchrun: shard weights, gradients and optimizer state over the processes "
                      "(FSDP2, bf16 compute on CUDA) and checkpoint in shards (torch.distributed.checkpoint)")
    stop_at: int = knob(0, "stop (and checkpoint) after this step, to resume later; 0 = run to max_steps")
    extra: dict = field(default_factory=dict)  # run metadata kept in trainer_state.json

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise FANformerError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "eval_every", "save_every", "stop_at", "loss_chunk"):
            if getattr(self, name) < 0:
                raise FANformerError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0 or self.weight_decay < 0:
            raise FANformerError("lr must be > 0, min_lr_ratio in [0, 1], grad_clip and weight_decay >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise FANformerError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.fsdp and self.optimizer != "adamw":
            raise FANformerError(f"--fsdp shards torch's AdamW state already; bitsandbytes' {self.optimizer} "
                                 "cannot hold sharded tensors: use --optimizer adamw with --fsdp")


# --- Pure pieces --------------------------------------------------------------

def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def check_enough_tokens(n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len + 1:
        raise FANformerError(f"the training split has {n_tokens} tokens, fewer than one window of "
                             f"{seq_len + 1} (seq_len + 1); use more data or a smaller --seq-len")


def batch_starts(n_tokens: int, seq_len: int, count: int, seed: int, step: int) -> np.ndarray:
    """Start offsets of the `count` windows of optimizer step `step` (the global batch)."""
    check_enough_tokens(n_tokens, seq_len)
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=count)  # the last window ends at n_tokens


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, seq_len) at the given offsets."""
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linears, embeddings); never norms, biases or residual gates."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_memory_options(model: FANformer, config: TrainConfig) -> None:
    """Switch the model's block checkpointing and chunked loss as the config says."""
    model.checkpoint_blocks, model.loss_chunk = config.activation_checkpointing, config.loss_chunk


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: torch's (fused on CUDA), or bitsandbytes' 8-bit AdamW.

    The 8-bit one (Dettmers et al. 2022, arXiv 2110.02861) keeps both moments block-wise
    quantized to uint8 with a float absmax per 256 values, so its state is plain tensors that
    the safetensors training state saves and restores exactly; tensors under 4096 values
    (norms, biases) keep 32-bit state, as bitsandbytes does by default.
    """
    groups = param_groups(model, config.weight_decay)
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(groups, lr=config.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=device.type == "cuda")


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise FANformerError(f"--optimizer adamw8bit needs bitsandbytes ({err}); "
                             "pip install 'bitsandbytes>=0.46', or use --optimizer adamw") from None
    return bitsandbytes


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
             max_batches: int, device: torch.device) -> float | None:
    """Mean next-token loss over consecutive non-overlapping windows of a held-out split."""
    n_windows = min((len(tokens) - 1) // seq_len, max_batches * batch_size)
    if n_windows <= 0:  # an empty split gives -1 // seq_len = -1
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        x, y = windows(tokens, starts, seq_len)
        with autocast(device):
            logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- Distributed --------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # The process group for the loop's CPU-side flags (a stop request): gloo, so that agreeing
    # on one never waits for the GPU's queue. None: the default group, already gloo on the CPU.
    control: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")  # every rank, in step
    return Dist(rank, world, local_rank, control)


def default_device(dist_info: Dist) -> torch.device:
    return torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")


# --- Training state (no pickle: tensors to safetensors, the rest to JSON) -----------

def pack_training_state(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig,
                        tokens_seen: int) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    stored: set[int] = set()
    for idx, state in opt["state"].items():
        for name, value in _flat_items(state):
            if torch.is_tensor(value):
                value = value.detach().cpu().contiguous()
                if value.data_ptr() in stored:  # bitsandbytes shares one qmap; safetensors wants each tensor once
                    value = value.clone()
                stored.add(value.data_ptr())
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    state = {**trainer_state(step, config, tokens_seen), "optimizer": {"param_groups": groups, "scalars": scalars}}
    return tensors, state


def trainer_state(step: int, config: TrainConfig, tokens_seen: int) -> dict:
    """trainer_state.json's position, schedule and config (a sharded checkpoint's whole file)."""
    return {"step": step, "tokens_seen": tokens_seen, "data_position": {"seed": config.seed, "step": step},
            "schedule": {"lr": config.lr, "warmup_steps": config.warmup_steps, "max_steps": config.max_steps,
                         "min_lr_ratio": config.min_lr_ratio},
            "train_config": asdict(config)}


def unpack_training_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          state: dict, device: torch.device) -> int:
    """Restore optimizer and RNG state; returns the step to continue from."""
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            _set_flat(opt_state.setdefault(int(idx), {}), name, value.to(device) if name != "step" else value)
    for idx, values in state["optimizer"]["scalars"].items():
        for name, value in values.items():
            _set_flat(opt_state.setdefault(int(idx), {}), name, value)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return int(state["step"])


def _flat_items(state: dict, prefix: str = ""):
    """(dotted name, value) for every leaf of a nested optimizer state: bitsandbytes keeps
    its 8-bit buffers in a sub-dict of each parameter's state."""
    for name, value in state.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _set_flat(state: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        state = state.setdefault(name, {})
    state[leaf] = value


def check_resumable(state: dict, config: TrainConfig, out: Path) -> None:
    """Refuse a resume whose saved state the current options cannot continue."""
    saved = state["train_config"]
    optimizer = saved.get("optimizer", "adamw")
    if optimizer != config.optimizer:
        raise FANformerError(f"{out} holds {optimizer} optimizer state, which --optimizer {config.optimizer} "
                             f"cannot continue; resume with --optimizer {optimizer}")
    sharded = bool(saved.get("fsdp", False))
    if sharded != config.fsdp:
        how = "under torchrun with --fsdp" if sharded else "without --fsdp"
        raise FANformerError(f"{out} was trained {'with' if sharded else 'without'} --fsdp and its state is "
                             f"saved {'in shards' if sharded else 'whole'}; resume it {how}")
    if state["step"] >= config.max_steps:
        raise FANformerError(f"{out} has already trained {state['step']} of --max-steps {config.max_steps}; "
                             "pass a larger --max-steps to train further")


# --- The loop -----------------------------------------------------------------

def optimizer_step(net: torch.nn.Module, model: FANformer, optimizer: torch.optim.Optimizer,
                   tokens: np.ndarray, starts: np.ndarray, seq_len: int, config: TrainConfig,
                   dist_info: Dist, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this process's share of the global batch `starts`.

    Micro-batch m of rank r takes rows (m * world + r) * batch_size onwards; DDP syncs
    gradients only on the last micro-batch. Returns the mean loss over all ranks and the
    gradient norm before clipping, as 0-d tensors on `device`: reading them (`.item()`)
    waits for the GPU, so the loop does it only at log steps.
    """
    loss_sum = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        first = (micro * dist_info.world + dist_info.rank) * config.batch_size
        x, y = windows(tokens, starts[first:first + config.batch_size], seq_len)
        if device.type == "cuda":  # page-locked, so the copies below overlap the previous step's kernels
            x, y = x.pin_memory(), y.pin_memory()
        last_micro = micro == config.grad_accum - 1
        # DDP all-reduces only the last micro-batch's gradients; FSDP reduce-scatters each one, so
        # that no rank ever holds a whole gradient.
        skip_sync = not last_micro and dist_info.world > 1 and hasattr(net, "no_sync")
        with (net.no_sync() if skip_sync else contextlib.nullcontext()), autocast(device):
            # aux: the Fourier head's smoothness penalty (0 for the linear head); the logged loss is the LM loss.
            loss, aux = net(x.to(device, non_blocking=True), targets=y.to(device, non_blocking=True))
        ((loss + aux) / config.grad_accum).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip > 0 \
        else torch.zeros((), device=device)
    if isinstance(grad_norm, DTensor):  # FSDP: a norm over the shards of every rank
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = loss_sum / config.grad_accum
    if dist_info.world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= dist_info.world
    return mean_loss, grad_norm


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the step it is in, so the
    checkpoint it then writes holds a finished step (an interrupt inside the optimizer
    update would leave some parameters updated and others not). A second SIGINT stops at
    once. Handlers are installed only in the main thread, and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self, dist_info: Dist) -> bool:
        """Whether any process was asked to stop: every rank must stop at the same step.
        Asked every step, over the CPU-side group: a flag on the GPU, all-reduced by NCCL and
        read back, would wait for every queued kernel, a host sync per step."""
        if dist_info.world == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None))
        dist.all_reduce(flag, group=dist_info.control)
        return bool(flag.item())


def train(model: FANformer, tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray,
          config: TrainConfig, out: str | Path, resume: tuple[dict, dict] | None = None,
          progress: bool = True) -> dict:
    """Train `model` in place and write checkpoints to `out`; returns the last metrics."""
    out = Path(out)
    dist_info = init_distributed()
    device = default_device(dist_info)
    model.to(device).train()
    seq_len = config.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise FANformerError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    check_enough_tokens(len(train_tokens), seq_len)  # before anything is written to `out`
    if len(val_tokens) < seq_len + 1:  # a small corpus (one document): train on, without val_loss
        log.warning("the validation split has %d tokens, fewer than one window of %d: val_loss will not be "
                    "reported. Add documents (about 1 in 20 is held out for validation) or lower --seq-len",
                    len(val_tokens), seq_len + 1)

    if resume is not None:
        check_resumable(resume[1], config, out)
    if config.fsdp and dist_info.world == 1:
        raise FANformerError("--fsdp shards the model over the processes of a torchrun launch: start it with "
                             "torchrun --nproc_per_node N (N >= 2) -m fanformer.cli train ..., or drop --fsdp")
    use_memory_options(model, config)
    if config.fsdp:
        from fanformer import fsdp  # torch.distributed.fsdp and .checkpoint: only for FSDP runs

        fsdp.shard_model(model, device)  # before the optimizer, which must hold the shards
    optimizer = build_optimizer(model, config, device)
    step, tokens_seen = 0, 0
    if resume is not None:
        if config.fsdp:
            fsdp.load_sharded(out, model, optimizer)
            step = int(resume[1]["step"])
        else:
            step = unpack_training_state(optimizer, *resume, device=device)
        tokens_seen = int(resume[1].get("tokens_seen", 0))
    net: torch.nn.Module = model
    if dist_info.world > 1 and not config.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)

    global_batch = config.batch_size * config.grad_accum * dist_info.world
    stop = min(config.max_steps, config.stop_at or config.max_steps)
    last: dict = {}
    bar = tqdm(total=stop, initial=step, desc="train", disable=not (progress and dist_info.main),
               dynamic_ncols=True)

    def checkpoint() -> None:
        if config.fsdp:  # every rank writes its shards; the run's last checkpoint also gets model.safetensors
            fsdp.save_sharded(out, model, optimizer, tokenizer, trainer_state(step, config, tokens_seen),
                              {METRICS_FILE: jsonl(metrics)}, consolidate=step == stop)
        elif dist_info.main:
            save_checkpoint(out, model, tokenizer, extra_files={METRICS_FILE: jsonl(metrics)},
                            training_state=pack_training_state(optimizer, step, config, tokens_seen))

    # Records after the checkpoint we resume from belong to steps about to be redone.
    metrics = [r for r in _read_metrics(out) if r["step"] <= step] if resume is not None else []
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        # The live log restarts from what the checkpoint knows (nothing, for a new run).
        (out / METRICS_FILE).write_text(jsonl(metrics))
    t0, tokens_since = time.perf_counter(), 0
    with GracefulStop() as stopper:
        while step < stop:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = batch_starts(len(train_tokens), seq_len, global_batch, config.seed, step)
            loss_t, grad_norm_t = optimizer_step(net, model, optimizer, train_tokens, starts, seq_len,
                                                 config, dist_info, device)
            step += 1
            tokens_seen += global_batch * seq_len
            tokens_since += global_batch * seq_len
            bar.update(1)
            record = None
            evaluating = bool(config.eval_every and step % config.eval_every == 0) or step == stop
            if step % config.log_every == 0 or evaluating:
                train_loss = loss_t.item()  # the only waits on the device: log and eval steps
            if step % config.log_every == 0 or step == stop:
                grad_norm = grad_norm_t.item()
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": round(train_loss, 6), "lr": lr, "grad_norm": grad_norm,
                          "tokens": tokens_seen, "tok_per_s": round(tokens_since / max(elapsed, 1e-9), 1)}
                t0, tokens_since = time.perf_counter(), 0
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            if evaluating:
                val = evaluate(model, val_tokens, seq_len, config.batch_size, config.eval_batches, device)
                if val is not None:
                    record = record or {"step": step, "loss": round(train_loss, 6), "tokens": tokens_seen}
                    record.update(val_loss=round(val, 6), val_ppl=round(math.exp(min(val, 50.0)), 3))
                    if dist_info.main:
                        bar.write(f"step {step}: val loss {val:.4f}, ppl {math.exp(min(val, 50.0)):.2f}")
            if record is not None and dist_info.main:
                metrics.append(record)
                with open(out / METRICS_FILE, "a") as f:  # live log; each checkpoint rewrites it whole
                    f.write(json.dumps(record) + "\n")
                last = record
            saving = bool(config.save_every and step % config.save_every == 0) or step == stop
            if saving:
                checkpoint()
            if step < stop and stopper.requested(dist_info):
                if not saving:
                    checkpoint()  # the last finished step, so --resume continues exactly
                if dist_info.main:
                    log.info("stopped after step %d; saved it to %s: --resume continues from there", step, out)
                raise KeyboardInterrupt
    bar.close()
    if dist_info.world > 1:
        dist.barrier()
    return last


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _read_metrics(out: Path) -> list[dict]:
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
