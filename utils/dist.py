"""torch.distributed in one place: initialise from the launcher's environment, rank helpers, reductions.

Works unchanged in a plain single process (rank 0 of 1, nothing initialised). Launchers understood:
``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and the legacy
``python -m torch.distributed.launch`` (the same variables plus a ``--local-rank``/``--local_rank`` argument).
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist


def pop_local_rank_arg(argv: list[str]) -> int | None:
    """Remove the legacy launcher's ``--local-rank=N`` / ``--local_rank N`` from ``argv`` and return N."""
    for i, arg in enumerate(list(argv)):
        for name in ("--local-rank", "--local_rank"):
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
                del argv[i:i + 2]
                return int(value)
            if arg.startswith(name + "="):
                del argv[i]
                return int(arg.split("=", 1)[1])
    return None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(argv: list[str] | None = None, timeout_minutes: int = 30) -> torch.device:
    """Initialise the process group if a launcher started us; return this process's device.

    NCCL on CUDA, gloo on CPU. ``argv`` (default ``sys.argv``) loses the legacy ``--local-rank`` argument.
    """
    argv = sys.argv if argv is None else argv
    legacy_local_rank = pop_local_rank_arg(argv)
    if legacy_local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(legacy_local_rank))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", get_local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place; identity in a single process."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def reduce_over_ranks(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """The element-wise ``op`` ("sum" or "max") of ``values`` over all ranks, in float64 (one small all-reduce);
    ``values`` themselves in a single process. "max" of flags every rank must act on alike: "a rank saw a
    non-finite loss", "a rank got a signal"."""
    if not (is_initialized() and get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
