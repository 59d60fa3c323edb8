"""Model registry: named sizes and ``build_*`` functions.

STAR sizes follow the official recipe (width 64*depth, depth heads); the patch schedule comes from the
resolution (256 / 512 / 1024, see ``PATCH_NUMS``). Tiny sizes are for tests and the CPU quickstart.
"""
from __future__ import annotations

import dataclasses

from models.star import STAR, StarConfig
from models.vqvae import PATCH_NUMS, VQVAE, VQVAEConfig

# Keyword overrides of StarConfig per named size.
STAR_SIZES: dict[str, dict] = {
    "star-d16": dict(depth=16),
    "star-d20": dict(depth=20),
    "star-d24": dict(depth=24),
    "star-d30": dict(depth=30),
    # The reference tiny model of ../shared/reference (golden tensors): 64x64 images, 4 scales.
    "star-tiny": dict(depth=2, width=128, num_heads=2, vocab_size=256, z_channels=8, text_dim=64,
                      patch_nums=(1, 2, 3, 4)),
}

VQVAE_SIZES: dict[str, dict] = {
    "vqvae-f16-c160": dict(),  # VAR's vae_ch160v4096z32.pth
    "vqvae-tiny": dict(vocab_size=256, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)),  # reference tiny VAE
}


def _sized_config(kind: str, sizes: dict, cls, size: str, resolution: int | str | None, overrides: dict):
    """A registry entry (+ the patch schedule of a resolution, + overrides), validated."""
    if size not in sizes:
        raise KeyError(f"unknown {kind} size {size!r}; known: {', '.join(sizes)}")
    kwargs = dict(sizes[size])
    if resolution is not None:
        kwargs["patch_nums"] = PATCH_NUMS[str(resolution)]
    kwargs.update(overrides)
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def star_config(size: str, resolution: int | str | None = None, **overrides) -> StarConfig:
    return _sized_config("STAR", STAR_SIZES, StarConfig, size, resolution, overrides)


def vqvae_config(size: str = "vqvae-f16-c160", resolution: int | str | None = None, **overrides) -> VQVAEConfig:
    return _sized_config("VQ-VAE", VQVAE_SIZES, VQVAEConfig, size, resolution, overrides)


def build_star(cfg: StarConfig, init: bool = True) -> STAR:
    model = STAR(dataclasses.replace(cfg))
    if init:
        model.init_weights()
    return model


def build_vqvae(cfg: VQVAEConfig) -> VQVAE:
    return VQVAE(cfg)


__all__ = ["STAR", "StarConfig", "VQVAE", "VQVAEConfig", "PATCH_NUMS", "STAR_SIZES", "VQVAE_SIZES",
           "star_config", "vqvae_config", "build_star", "build_vqvae"]
