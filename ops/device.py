"""Device, dtype and thread handling shared by every command (``--device``, ``--dtype``, ``--threads``)."""

from __future__ import annotations

import torch

from .errors import UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; ``cuda[:N]``, ``mps`` and ``cpu`` are checked to exist. Under a
    data-parallel launcher (``WORLD_SIZE`` > 1, :mod:`ops.train.distributed`) ``auto`` and ``cuda`` mean this
    process's GPU, ``cuda:LOCAL_RANK``."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        from .train import distributed

        if distributed.world() > 1:
            return resolve_device(f"cuda:{distributed.local_rank()}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU and fp16 on accelerators (bf16 where the GPU supports it)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: choose auto, fp32, fp16 or bf16")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ threads
THREADS_ENV = "CLOAK_THREADS"


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``), or ``None`` when unlimited or unknown.

    cgroup v2 writes ``"<quota> <period>"`` (or ``"max <period>"``) to ``cpu.max``; cgroup v1 has
    ``cpu/cpu.cfs_quota_us`` (``-1`` = unlimited) and ``cpu/cpu.cfs_period_us``."""
    import os

    try:
        with open(os.path.join(root, "cpu.max")) as handle:
            quota, _, period = handle.read().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or 100000)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as handle:
            quota_us = int(handle.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as handle:
            period_us = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def default_threads(root: str = "/sys/fs/cgroup", affinity: set[int] | None = None) -> int:
    """The CPUs this process may use: its affinity mask (``os.sched_getaffinity``), capped by the cgroup quota
    rounded up (a quota of 1.5 CPUs → 2), shared equally by the processes of a data-parallel launcher on this machine
    (``LOCAL_WORLD_SIZE``). torch's own default is every core of the machine, which oversubscribes a
    container or a shared host (issue 20: 122 s with torch's default vs 18 s with one thread on a busy machine)."""
    import math
    import os

    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # macOS/Windows have no affinity call
            affinity = set(range(os.cpu_count() or 1))
    count = max(1, len(affinity))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.ceil(limit - 1e-9)))
    from .train import distributed

    # a data-parallel launcher's processes on this machine share those CPUs (torchrun itself would give each one)
    return max(1, count // distributed.local_world()) if distributed.world() > 1 else count


def resolve_threads(value: int | None) -> int:
    """``--threads`` value, else ``CLOAK_THREADS``, else :func:`default_threads`; must be ≥ 1."""
    import os

    if value is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                raise UsageError(f"{THREADS_ENV}={text!r}: give a whole number of threads >= 1") from None
            if value < 1:
                raise UsageError(f"{THREADS_ENV}={text!r}: give a whole number of threads >= 1")
        else:
            value = default_threads()
    if value < 1:
        raise UsageError(f"--threads {value}: give a whole number of threads >= 1")
    return value


def apply_threads(count: int) -> int:
    """Set torch's intra-op threads to ``count`` and its inter-op threads to at most ``count`` (inter-op can only be
    set before the first parallel work, so a later call keeps what is there)."""
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:
        pass
    return torch.get_num_threads()
