"""Tiny training setups for the loop tests (CPU, seconds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from models.checkpoint import save_pretrained
from models.vqvae import VQVAE, VQVAEConfig

REPO = Path(__file__).resolve().parents[1]
TINY_VQVAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 2], patch_nums=[1, 2, 4])


def make_vqvae_dir(path: Path) -> Path:
    torch.manual_seed(0)
    save_pretrained(path, vqvae=VQVAE(VQVAEConfig(**{**TINY_VQVAE, "ch_mult": (1, 2), "patch_nums": (1, 2, 4)})))
    return path


def star_overrides(out_dir: Path, vqvae_dir: Path, steps: int = 6, **extra) -> list[str]:
    args = {
        "stage": "star", "star_train.vqvae": str(vqvae_dir), "loop.out_dir": str(out_dir), "loop.steps": steps,
        "loop.batch_size": 8, "loop.ckpt_every": 3, "loop.log_every": 1, "loop.keep_last": 5,
        "model.depth": 2, "model.width": 64, "model.num_heads": 2, "model.vocab_size": 64, "model.z_channels": 8,
        "model.text_dim": 64, "model.patch_nums": "[1,2,4]", "model.drop_path_rate": 0.05,
        "vqvae.vocab_size": 64, "vqvae.z_channels": 8, "vqvae.ch": 32, "vqvae.ch_mult": "[1,2]",
        "vqvae.patch_nums": "[1,2,4]", "data.shapes_count": 200, "optim.lr": 3e-3, "optim.warmup_steps": 2,
        "optim.ema_decay": 0.9, "data.caption_dropout": 0.1,
    }
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def vqvae_overrides(**extra) -> list[str]:
    """train.py arguments for a tiny VQ-VAE (8x8 images) on 64 shapes samples; ``extra``: section.key=value."""
    args = {"stage": "vqvae", "vqvae.vocab_size": 32, "vqvae.z_channels": 8, "vqvae.ch": 32, "vqvae.ch_mult": "[1,2]",
            "vqvae.patch_nums": "[1,2,4]", "data.shapes_count": 64, "loop.batch_size": 8}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def run_train(args: list[str], torchrun: int = 0, env_extra: dict | None = None, timeout: int = 300,
              script: str = "train.py") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run(prefix + [str(REPO / script)] + args, env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    name = "model.safetensors" if (out_dir / "final" / "model.safetensors").is_file() else "vqvae.safetensors"
    return load_file(str(out_dir / "final" / name))


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.txt").read_text().splitlines()]
