"""
Data parallelism: the torchrun environment, sums over ranks, and FSDP2 sharding of the student.

What it does. Every rank samples, scores and trains on its own share of the step's prompts; the
gradients are averaged over ranks, by DDP's all-reduce (train.py wraps the student in DDP in one
line) or, for students whose AdamW state does not fit one GPU, by FSDP2's reduce-scatter: each
decoder layer is a shard unit and the root (embeddings, final norm, lm_head) is another, so a rank
holds 1/world_size of the fp32 weights, gradients and AdamW moments and all-gathers one layer at a
time in bf16 for compute (torch.distributed.fsdp.fully_shard, MixedPrecisionPolicy).

Departures from the paper: the paper trains with VERL's FSDP workers; here DDP and FSDP2 give the
same gradients (tests/test_train.py: FSDP2 = DDP to 1e-5).
"""

import os

import torch
import torch.distributed as dist


def init() -> tuple[bool, int, int, torch.device]:
    """(launched by torchrun?, rank, world size, this rank's device); joins the process group."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (the identity on one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def same_count(batches: list[dict], device) -> tuple[list[dict], list[int]]:
    """Pad a rank's micro-batches with zero-weight copies of its last one (mask 0: no loss, no gradient,
    no statistics) up to the largest count over ranks: under FSDP2 every forward and backward is a
    collective, so a rank with fewer would leave the others waiting forever. Returns the padded list
    and every rank's own count."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    counts = torch.zeros(world_size, dtype=torch.long, device=device)
    counts[dist.get_rank() if dist.is_initialized() else 0] = len(batches)
    counts = all_sum(counts).tolist()
    zero_weight = batches[-1] | {"mask": torch.zeros_like(batches[-1]["mask"])}
    return batches + [zero_weight] * (max(counts) - len(batches)), counts


def fsdp2(model: torch.nn.Module, decoder_layers, device: torch.device, world_size: int) -> torch.nn.Module:
    """Shard each decoder layer, then the root: bf16 compute on GPUs with fp32 master weights and
    fp32 gradient reductions (float32 throughout on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)
    return model


def finish(ddp: bool, close_first=None) -> None:
    """Leave a torchrun job: barrier, close_first() (a vLLM engine, whose teardown under torchrun
    also destroys the process group), destroy the group if it is still there, and exit without the
    interpreter's teardown (destroying gloo's C++ threads there can, rarely, abort a finished run
    with "terminate called without an active exception", exit code -6, which torchrun reports as a
    failed job)."""
    if ddp:
        dist.barrier()
    if close_first is not None:
        close_first()
    if not ddp:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
