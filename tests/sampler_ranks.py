"""Run by tests/test_train_sampler.py under ``torchrun``: train the sampler head, then every rank saves its own
copy of the head (rank 0 alone exports normally), so the test can check that the ranks stayed identical."""
import sys
from pathlib import Path

import torch

import train
from trainer.loop import train as train_loop
from trainer.sampler_stage import SamplerStage
from utils import dist


def main() -> int:
    device = dist.init_distributed()
    cfg = train.parse_args(sys.argv[1:])
    torch.manual_seed(cfg.loop.seed)
    stage = SamplerStage(cfg, device)
    train_loop(cfg, stage, train.build_dataset(cfg, stage.resolution), device)
    torch.save(stage.model.state_dict(), Path(cfg.loop.out_dir) / f"head_rank{dist.get_rank()}.pt")
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
