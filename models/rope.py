"""Normalized 2D rotary position embedding (official STAR ``compute_axial_cis`` semantics, as real cos/sin tables).

Every scale is a pn x pn grid whose positions are normalised to [0, rope_norm]: column/(pn-1)*rope_norm and
row/(pn-1)*rope_norm (a 1x1 scale, the start token, sits at (0, 0)). Head channels are rotated in adjacent
pairs (2i, 2i+1); pairs 0..hd/4-1 rotate with the column position, the rest with the row position, both with
frequencies theta^(-k/(hd/4)), k = 0..hd/4-1.
"""
from __future__ import annotations

import torch


def rope_angles(patch_nums: tuple[int, ...], head_dim: int, theta: float, norm: float) -> torch.Tensor:
    """Rotation angles (L, head_dim/2) for all scales concatenated, in float32 as the official code."""
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[:quarter].float() / head_dim))  # (hd/4,)
    angles = []
    for pn in patch_nums:
        t = torch.arange(pn * pn, dtype=torch.float32)
        col, row = t % pn, torch.div(t, pn, rounding_mode="floor")
        if pn > 1:
            col, row = col / col.max() * norm, row / row.max() * norm
        angles.append(torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1))
    return torch.cat(angles, dim=0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (..., L, hd) by the angles whose cos/sin are (L, hd/2)."""
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))
    re, im = x.unbind(-1)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(dtype)
