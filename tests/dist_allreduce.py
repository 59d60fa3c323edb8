"""Run by tests/test_dist.py under ``torchrun --nproc_per_node=2``: init, all-reduce, check, exit 0."""
import sys

import torch

from utils import dist


def main() -> int:
    device = dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert dist.is_initialized() and world == 2, (rank, world)
    x = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce_mean(x)
    expected = sum(r + 1 for r in range(world)) / world
    assert abs(x.item() - expected) < 1e-6, (x.item(), expected)
    dist.barrier()
    print(f"rank {rank}/{world} local {dist.get_local_rank()} ok {x.item()}")
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
