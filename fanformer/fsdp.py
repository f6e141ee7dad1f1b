"""Fully sharded data parallel training: PyTorch's FSDP2 (`fully_shard`) and sharded
checkpoints with torch.distributed.checkpoint (DCP).

`fanformer train --fsdp` under torchrun shards the weights, gradients and AdamW state
over the processes: each block is one FSDP unit (its weights are all-gathered just
before it runs and freed after), the embedding, final norm and (tied) LM head form the
root unit. On CUDA the blocks compute in bf16 (`MixedPrecisionPolicy`: bf16 weights for
the matmuls, gradients reduced in fp32, fp32 master weights and optimizer state); on the
CPU (gloo, the tests) everything stays fp32, as the CPU path of fanformer/training.py does.

A sharded checkpoint is the usual directory (fanformer/checkpoint.py) with the weights,
optimizer state and RNG in `sharded/`, every process writing its own shard, instead of
model.safetensors and training_state.safetensors. DCP reshards on load, so a run may
resume on another number of processes (tested from 2 to 4; the global batch is
--batch-size x processes, so a resume on another count passes --batch-size to keep it). When a run ends (max_steps or --stop-at),
the full weights are also gathered into the usual model.safetensors, so the directory
loads like any other checkpoint. All processes must see the same `--out` (on several
nodes, a shared filesystem), as DCP requires.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fanformer.checkpoint import SHARDED_DIR, model_state_dict, write_checkpoint_files
from fanformer.outputs import new_temp_dir, write_directory_atomically
from fanformer.model import FANformer


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; fp32 throughout on the CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: FANformer, device: torch.device) -> FANformer:
    """Shard `model` in place over the default process group: one FSDP unit per block, the
    rest in the root. Call it before building the optimizer, which must see the shards."""
    policy = mixed_precision(device)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_sharded(out: str | Path, model: FSDPModule, optimizer: torch.optim.Optimizer, tokenizer,
                 trainer_state: dict, extra_files: dict[str, str], consolidate: bool) -> None:
    """Write the checkpoint directory `out` from every process, atomically.

    Rank 0 makes the temporary folder; every rank writes its shards into it; with
    `consolidate`, the full weights are gathered to rank 0 for model.safetensors; rank 0
    adds the other files and swaps the folder in. Collective: all ranks call it.
    """
    holder = [str(new_temp_dir(out)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    tmp = Path(holder[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # RNG: the ranks were seeded alike and draw alike, so rank 0's state (saved once) is every rank's.
    dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=tmp / SHARDED_DIR)
    weights = None
    if consolidate:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights = model_state_dict(model, full) if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        write_directory_atomically(out, lambda folder: write_checkpoint_files(
            folder, model.config, tokenizer, weights, training_state=(None, trainer_state),
            extra_files=extra_files), tmp=tmp)
    dist.barrier()  # nobody reads or rewrites `out` before it is in place


def load_sharded(out: str | Path, model: FSDPModule, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights, optimizer state and RNG from `out`'s shards into the sharded model
    and its optimizer (resharding if the process count changed). Collective."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the shapes and shards to fill
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    dcp.load(state, checkpoint_id=Path(out) / SHARDED_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
