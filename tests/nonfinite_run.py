"""A toy stage whose loss or gradients go non-finite on chosen steps, for the loop's skip logic.

Imported by tests/test_nonfinite.py; also run there under ``torchrun --nproc_per_node=2`` (``main``), where
only rank 1 sees a non-finite loss.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from trainer.config import RunConfig
from trainer.loop import train
from utils import dist


class Vectors(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.linspace(-1, 1, 4) * (i + 1) / 64, "caption": ""}


class ToyStage:
    """Least squares on a linear layer. On the calls in ``bad_calls``: ``kind="loss"`` adds NaN to the loss (its
    gradients stay finite); ``kind="gradient"`` adds sqrt(0 * w), whose value is 0 and whose gradient is NaN."""

    def __init__(self, bad_calls: set[int], kind: str):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.bad_calls, self.kind, self.calls = bad_calls, kind, 0

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        self.calls += 1
        loss = (model(batch["image"]).squeeze(1) - 1).square().mean()
        if self.calls in self.bad_calls:
            loss = loss + float("nan") if self.kind == "loss" else loss + self.model.weight.sum().mul(0).sqrt()
        return loss, {}

    def after_step(self, step: int, metrics: dict) -> None:
        pass

    def sample(self, step: int, out_dir: Path, writer) -> None:
        pass

    def export(self, out_dir: Path, ema_state: dict | None) -> None:
        pass


def run(out_dir: Path, stage: ToyStage, steps: int, device: torch.device, **loop) -> dict:
    cfg = RunConfig(stage="vqvae")
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule = 0.05, 0.0, "constant"
    cfg.loop.steps, cfg.loop.batch_size, cfg.loop.out_dir, cfg.loop.log_every = steps, 8, str(out_dir), 1
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    return train(cfg, stage, Vectors(), device)


def main() -> int:
    device = dist.init_distributed()
    rank = dist.get_rank()
    stage = ToyStage({3} if rank == 1 else set(), "loss")
    last = run(Path(sys.argv[1]), stage, 6, device, ckpt_every=100)
    weights = torch.cat([p.detach().flatten() for p in stage.model.parameters()])
    result = {"step": last["step"], "calls": stage.calls, "weights": weights.tolist()}
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(result))  # a file each: prints interleave
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
