"""Multi-process data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Launch ``fsg train`` (or your own script calling :class:`fsg.Trainer`) with ``torchrun``::

    torchrun --nproc-per-node 2 -m fsg train --estimator fsg ... --batch-size 128

``--batch-size`` stays the *global* batch: each of the ``world`` processes takes its contiguous
slice of every global batch (:func:`shard_bounds`; the random crop/flip numbers are drawn for the
whole global batch, so every image gets the augmentation it would get in one process).

Why not ``DistributedDataParallel``: the trainer's look-ahead forward goes through
``torch.func.functional_call`` and the estimators read the gradient captured at the binary weight
``∂L/∂Ŵ`` by a tensor hook — neither passes through DDP's reducer. Instead, after each backward
the :class:`fsg.Trainer` calls :func:`weighted_average_` once on one flat buffer holding

* every ``.grad`` of the model and of the estimator's hypernetworks,
* every binarized layer's captured ``∂L/∂Ŵ`` (the input of the next meta-gradient and of FSG's HGS),
* the floating-point buffers (BatchNorm running statistics),
* the loss and the number of correct predictions,

each weighted by the rank's share ``n_r / N`` of the global batch and summed. For a loss that is a
mean over samples this is exactly the gradient of the global batch (up to float summation order),
so all ranks apply identical updates to identical parameters: the hypernetworks, FSG's gradient
history, LSTMFC's carried states and the streaming slow-net states stay identical on every rank
without ever being communicated. BatchNorm still normalises with each rank's own batch
statistics (as DDP does), so only a model without BatchNorm matches a one-process run with the
global batch; its running statistics are averaged with the same weights.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "is_distributed", "rank", "world_size", "is_main_process", "init_from_env", "shard_bounds",
    "weighted_average_", "broadcast_", "all_reduce_sum", "barrier",
]


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return _dist().get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes logs and checkpoints."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> Tuple[bool, str]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``/``RANK``/``MASTER_ADDR``… in
    the environment), if there is one of more than one process and none is initialised yet.

    Backend: NCCL for a CUDA ``device``, else gloo. On CUDA each process takes the GPU
    ``LOCAL_RANK``. Returns ``(initialised_here, device)`` with the device this process should use.
    """
    dist = _dist()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dev = torch.device(device)
    if world <= 1 or dist.is_initialized():
        return False, device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return True, device


def shard_bounds(n: int, rank_: int, world: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank_``'s contiguous slice of ``n`` items split over ``world``
    ranks as evenly as possible (sizes differ by at most one; the first ``n % world`` ranks get
    the larger size)."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def weighted_average_(tensors: Sequence[Tensor], n: float) -> float:
    """In place on every rank: ``t ← Σ_r n_r·t_r / Σ_r n_r`` for each tensor, where ``n_r`` is the
    ``n`` each rank passes (its number of samples). One float64 collective for all tensors
    together. Returns ``Σ_r n_r``. Outside a process group: returns ``n``, changes nothing."""
    if not is_distributed():
        return float(n)
    dev = tensors[0].device if tensors else torch.device("cpu")
    parts = [t.detach().reshape(-1).to(torch.float64) for t in tensors]
    flat = torch.cat(parts + [torch.ones(1, dtype=torch.float64, device=dev)])
    flat.mul_(float(n))
    _dist().all_reduce(flat)
    total = float(flat[-1].item())
    flat = flat[:-1].div_(total)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            k = t.numel()
            t.copy_(flat[offset:offset + k].view_as(t))
            offset += k
    return total


def all_reduce_sum(values: Sequence[float], device="cpu") -> List[float]:
    """The sums over ranks of a few Python numbers (one float64 collective)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_distributed():
        _dist().all_reduce(t)
    return t.tolist()


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values."""
    tensors = [t for t in tensors]
    if not tensors or not is_distributed():
        return
    dist = _dist()
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        _dist().barrier()
