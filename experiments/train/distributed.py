"""Data-parallel training under ``torchrun``: joining the process group, devices, gradient sync.

Distributed data parallel (``torchrun``): the process group is initialised from the environment
(gloo on CPU, nccl on CUDA); each rank draws its own data stream, gradients are averaged with
``all_reduce`` after each backward (equivalent to DDP's averaging; ``run_loop`` drives
``prepare``/``step``/``readout`` rather than ``forward``, so ``DistributedDataParallel``'s forward
hooks would not fire), and only rank 0 writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistInfo:
    """Rank and world size; ``enabled`` when a process group is in use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when world == 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available (this rank's local GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    return torch.device(name)


def broadcast_from_main(tensors: Iterable[Tensor], info: DistInfo) -> None:
    """Give every rank rank 0's values of ``tensors`` (the initial weights)."""
    if info.enabled:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average ``.grad`` over the ranks (what DDP does after backward)."""
    if not info.enabled:
        return
    for param in params:
        if param.grad is None:  # same pattern on every rank; all_reduce needs a tensor
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= info.world


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (every rank then takes the same branch)."""
    bad = torch.tensor([1.0 if flag else 0.0], device=device)
    if info.enabled:
        dist.all_reduce(bad)
    return bad.item() != 0
