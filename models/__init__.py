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


def star_config(size: str, resolution: int | str | None = None, **overrides) -> StarConfig:
    if size not in STAR_SIZES:
        raise KeyError(f"unknown STAR size {size!r}; known: {', '.join(STAR_SIZES)}")
    kwargs = dict(STAR_SIZES[size])
    if resolution is not None:
        kwargs["patch_nums"] = PATCH_NUMS[str(resolution)]
    kwargs.update(overrides)
    cfg = StarConfig(**kwargs)
    cfg.validate()
    return cfg


def vqvae_config(size: str = "vqvae-f16-c160", resolution: int | str | None = None, **overrides) -> VQVAEConfig:
    if size not in VQVAE_SIZES:
        raise KeyError(f"unknown VQ-VAE size {size!r}; known: {', '.join(VQVAE_SIZES)}")
    kwargs = dict(VQVAE_SIZES[size])
    if resolution is not None:
        kwargs["patch_nums"] = PATCH_NUMS[str(resolution)]
    kwargs.update(overrides)
    cfg = VQVAEConfig(**kwargs)
    cfg.validate()
    return cfg


def build_star(cfg: StarConfig, init: bool = True) -> STAR:
    model = STAR(dataclasses.replace(cfg))
    if init:
        model.init_weights()
    return model


def build_vqvae(cfg: VQVAEConfig) -> VQVAE:
    return VQVAE(cfg)


__all__ = ["STAR", "StarConfig", "VQVAE", "VQVAEConfig", "PATCH_NUMS", "STAR_SIZES", "VQVAE_SIZES",
           "star_config", "vqvae_config", "build_star", "build_vqvae"]
