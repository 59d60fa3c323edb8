"""CMMD (Jayasumana et al., 2024, "Rethinking FID"): MMD with a Gaussian RBF kernel between CLIP embeddings.

CMMD = scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)),  k(a, b) = exp(-|a - b|^2 / (2 sigma^2)),
with sigma = 10 and scale = 1000 as in the paper's reference code; means over all pairs (diagonal included), so
CMMD of a set with itself is exactly 0. Embeddings are the L2-normalised CLIP image embeddings.
"""
from __future__ import annotations

import torch

SIGMA = 10.0
SCALE = 1000.0


def _mean_kernel(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return torch.exp(-gamma * sq.clamp_min(0)).mean()


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """x (N, D), y (M, D) embeddings -> CMMD (float64 arithmetic)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) embeddings, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma ** 2)
    value = _mean_kernel(x, x, gamma) + _mean_kernel(y, y, gamma) - 2 * _mean_kernel(x, y, gamma)
    return float(scale * value)
