"""Data-parallel training across processes (one per GPU, or CPU processes with gloo), for train-ti, train-db and
immunize.

Launch any of them under ``torchrun`` or ``accelerate launch``; both set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, which is all this module reads::

    torchrun --nproc-per-node 4 -m cloaklab train-db photos -o db --batch-size 4 …
    accelerate launch --num_processes 4 -m cloaklab train-ti photos -o ti --batch-size 4 …

How a step is split (:func:`ops.train.loop.train`, :func:`ops.train.immunize.immunize`): every process draws the
*whole* batch from the run's one seeded CPU generator — data order, flips, latent samples, timesteps, noise,
prompts and DreamBooth's class batch — so every random stream stays identical on every process and equal to the
one-process run; each process then keeps its contiguous block of ``batch / world`` samples (:func:`slice_batch`),
computes its share of the loss (the sum over its samples ÷ the full batch size, so the shares add up to the batch
mean), and the gradients are summed over the processes (:func:`all_reduce_grads`) before the gradient norm is logged
or clipped and before the optimizer step. Every process then takes the same step from the same gradient, so the
weights stay equal without broadcasts, and the run equals the one-process run at the same ``--batch-size`` within
float round-off (summation order). The logged loss is the full batch's (the shares are summed too).

Only the main process (rank 0) writes files: the train log, checkpoints, snapshots, the final artefacts and the
manifest; every writer in cloak asks :func:`is_main` first. The process group starts on the first collective
(:func:`setup`): gloo for CPU tensors, plus NCCL for CUDA ones where CUDA exists; ``--device auto`` / ``cuda``
resolve to ``cuda:LOCAL_RANK`` (:func:`ops.device.resolve_device`).

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op, and importing this module loads no
torch (the manifest asks :func:`is_main`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import torch

BUCKET_ELEMENTS = 1 << 24  # gradients are summed in flat buckets of at most this many elements (64 MB in fp32)


def world() -> int:
    """How many processes train together (``WORLD_SIZE``; 1 without a launcher)."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's index among them (``RANK``; 0 without a launcher)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``): the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def local_world() -> int:
    """How many of them run on this machine (``LOCAL_WORLD_SIZE``; 1 without a launcher)."""
    return _env_int("LOCAL_WORLD_SIZE", 1)


def is_main() -> bool:
    """Whether this process writes the outputs (rank 0, or the only process)."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise UsageError(f"{name}={text!r} (set by the launcher) is not a whole number") from None


def setup() -> None:
    """Join the process group once (no-op for one process). Backends: gloo for CPU tensors and, where CUDA exists,
    NCCL for CUDA tensors (this process's GPU is ``cuda:LOCAL_RANK``)."""
    if world() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UsageError(f"WORLD_SIZE={world()} but {name} is not set: start data-parallel runs with torchrun or "
                             "accelerate launch (they set it)")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        if local_rank() < torch.cuda.device_count():
            torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, rank=rank(), world_size=world())


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if world() > 1:
        setup()
        import torch.distributed as dist

        dist.barrier()


def check_batch(batch_size: int, flag: str = "--batch-size") -> None:
    """Each process takes ``batch_size / world`` samples: refuse a batch the processes cannot share equally."""
    count = world()
    if batch_size % count:
        raise UsageError(f"{flag} {batch_size} is not divisible by the {count} processes of this data-parallel run: "
                         f"give a multiple of {count} (each process trains on {flag} ÷ {count} samples per step)")


def slice_batch(batch_size: int) -> slice:
    """This process's rows of a batch drawn in full: the contiguous block ``[r·b, (r+1)·b)``, ``b = batch / world``
    (all rows for one process). Call :func:`check_batch` first."""
    share = batch_size // world()
    return slice(rank() * share, (rank() + 1) * share)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes in place (and return it); one process: unchanged."""
    if world() > 1:
        setup()
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the ``.grad`` of ``params`` over the processes, in place (flat buckets per device and dtype).

    A parameter that got no gradient on some process (its share of the batch never reached it) counts as zero
    there; one that got none on any process keeps ``grad = None``, as it would in the one-process run (AdamW skips
    it). One process: no-op.
    """
    if world() <= 1:
        return
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    all_reduce_sum(has_grad)
    grads = []
    for p, count in zip(params, has_grad.tolist()):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in group:
            if bucket and size + grad.numel() > BUCKET_ELEMENTS:
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(grad)
            size += grad.numel()
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    import torch

    flat = torch.cat([grad.reshape(-1) for grad in grads])
    all_reduce_sum(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
