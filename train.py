#!/usr/bin/env python
"""Train a VQ-VAE, a STAR transformer or a sampler head from a JSON config.

    python train.py --config=configs/shapes_vqvae.json [--section.key=value ...]
    torchrun --nproc_per_node=8 train.py --config=configs/star_d16_256.json --data.lmdb_dirs=data/a,data/b
    python -m torch.distributed.launch --nproc_per_node=8 train.py --config=...   (legacy form also works)
    python train.py --config=configs/star_d16_256.json --print-config   (every key, resolved; nothing runs)

The stage ("vqvae", "star" or "sampler") comes from the config (train_sampler.py insists on "sampler").
Re-running the same command resumes from the newest valid checkpoint in loop.out_dir (loop.resume=auto).
SIGTERM, SIGUSR1 or Ctrl-C stop the run after the current step with a checkpoint (exit code 128 + signal number;
a second Ctrl-C stops at once): see trainer/stop.py.
"""
import sys
from pathlib import Path

import torch

from trainer.config import RunConfig
from trainer.loop import train
from trainer.stop import TrainingStopped
from utils import cli, dist
from utils.config import ConfigError, load_config, to_json
from utils.data.dataset import ImageTransform, LMDBImageTextDataset, ShapesDataset
from utils.data.shapes import MIN_RENDER_SIZE
from utils.logging import get_logger


def parse_args(argv: list[str], usage: str = __doc__) -> RunConfig:
    if not argv:  # the defaults alone cannot train anything (no data-set-specific settings, no VQ-VAE)
        raise ConfigError("no config given: pass --config=configs/<run>.json [--section.key=value ...] "
                          "(--help for more)")
    config_path, overrides, print_config = None, [], False
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--config":  # the space-separated form, as argparse would take it
            config_path = next(args, None)
            if config_path is None or config_path.startswith("--"):
                raise ConfigError("--config needs a path: --config=configs/<run>.json")
        elif arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        elif arg == "--print-config":
            print_config = True
        else:
            overrides.append(arg)
    cfg = load_config(RunConfig, config_path, overrides)
    if print_config:  # every key with its resolved value (what checkpoints store), then stop
        print(to_json(cfg))
        sys.exit(0)
    return cfg


def build_dataset(cfg: RunConfig, resolution: int, validation: bool = False):
    """The training set, or with ``validation`` the held-out set of ``loop.eval_every`` (no augmentation, no
    caption dropout; for shapes, the attribute combinations training never draws)."""
    d = cfg.data
    transform = ImageTransform(resolution) if validation else \
        ImageTransform(resolution, random_crop=d.random_crop, hflip=d.hflip)
    caption_dropout = 0.0 if validation else d.caption_dropout
    if d.source == "shapes":
        if resolution < MIN_RENDER_SIZE:  # the VQ-VAE's image size: patch_nums[-1] x 2^(len(ch_mult) - 1)
            raise ConfigError(f"the shapes data set draws images of {MIN_RENDER_SIZE} px or more; this VQ-VAE's "
                              f"are {resolution} px")
        count, split = (cfg.loop.eval_samples, "heldout") if validation else (d.shapes_count, "train")
        return ShapesDataset(count, transform, split, d.shapes_seed, d.shapes_texture, caption_dropout,
                             seed=cfg.loop.seed)
    dirs = d.val_lmdb_dirs if validation else d.lmdb_dirs
    dataset = LMDBImageTextDataset(dirs, transform, tuple(d.caption_keys) if d.caption_keys else None,
                                   caption_dropout, d.min_side, d.max_aspect, seed=cfg.loop.seed)
    if dataset.upscaled and dist.is_main_process():
        get_logger("star").warning(
            "%d of %d records in %s have a shorter side below the training resolution (%d px) and are upscaled to "
            "it: pack larger images, or leave them out with --data.min_side=%d", dataset.upscaled, len(dataset),
            "data.val_lmdb_dirs" if validation else "data.lmdb_dirs", resolution, resolution)
    return dataset


def main(argv: list[str], required_stage: str | None = None, usage: str = __doc__) -> int:
    """``usage``: the text ``--help`` prints (the calling entry script's docstring)."""
    device = dist.init_distributed(argv)  # consumes the legacy --local-rank argument
    cfg = parse_args(argv[1:], usage)
    if required_stage is not None and cfg.stage != required_stage:
        raise ConfigError(f"this entry point trains stage '{required_stage}' but the config says stage "
                          f"'{cfg.stage}' (use train.py, or set \"stage\": \"{required_stage}\")")
    # The run's train.log from here on: warnings from building the stage (another text encoder than the backbone's,
    # say) belong in it too.
    get_logger("star", Path(cfg.loop.out_dir) / "train.log")
    torch.manual_seed(cfg.loop.seed)  # same initial weights on every rank
    if cfg.stage == "vqvae":
        from trainer.vqvae_stage import VQVAEStage
        stage, resolution = VQVAEStage(cfg, device), cfg.vqvae.image_size
    else:
        from trainer.sampler_stage import SamplerStage, with_backbone_settings
        from trainer.star_stage import StarStage
        if cfg.stage == "sampler":  # checked against the backbone's own settings; its VQ-VAE if none is given
            cfg = with_backbone_settings(cfg)
        stage = (SamplerStage if cfg.stage == "sampler" else StarStage)(cfg, device)
        resolution = stage.resolution
    try:
        val_dataset = build_dataset(cfg, resolution, validation=True) if cfg.loop.eval_every else None
        train(cfg, stage, build_dataset(cfg, resolution), device, val_dataset)
    except TrainingStopped as stopped:  # SIGTERM / SIGUSR1 / Ctrl-C: a checkpoint of this step was written
        get_logger("star").warning("%s", stopped)
        dist.destroy()
        return stopped.exit_code
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv))
