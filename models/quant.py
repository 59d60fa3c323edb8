"""Multi-scale residual vector quantizer (VAR/STAR layout, key-compatible with ``vae_ch160v4096z32.pth``).

A latent map f (B, Cvae, H, W) becomes S token maps r_1..r_S of sides pn_1 < ... < pn_S = H:
    f_rest = f, f_hat = 0
    for scale s:  z = area_resize(f_rest, pn_s)   (the last scale is used as is)
                  r_s = nearest code of every z vector (row-major)
                  h = phi_s(bicubic_resize(E[r_s], H))            (the last scale is not resized)
                  f_hat += h;  f_rest -= h
phi_s are 3x3 convs mixed in by a ratio, shared by K groups of scales (index tables below).
f_hat is always accumulated in float32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def phi_index_table(num_scales: int, num_phis: int) -> list[int]:
    """Which of the K shared phi convs serves each scale: argmin_k |tick_k - s/(S-1)|.

    The ticks are numpy float64 linspace values exactly as the official code computes them, so that ties
    resolve the same way (S=10, K=4 -> [0,0,1,1,1,2,2,3,3,3]; S=14 -> [0,0,0,1,1,1,1,2,2,2,2,3,3,3]).
    """
    k = num_phis
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    at = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - a))) for a in at]


class Phi(nn.Conv2d):
    """phi(h) = (1 - ratio) * h + ratio * conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiShared(nn.Module):
    """K phi convs; scale s uses ``qresi_ls[table[s]]`` (official ``PhiPartiallyShared``)."""

    def __init__(self, channels: int, ratio: float, num_phis: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, ratio) for _ in range(num_phis)])

    def for_scale(self, si: int, num_scales: int) -> Phi:
        return self.qresi_ls[phi_index_table(num_scales, len(self.qresi_ls))[si]]


class MultiScaleQuantizer(nn.Module):
    """The residual quantizer. Module names match the official ``VectorQuantizer2``."""

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...], num_phis: int = 4,
                 phi_ratio: float = 0.5, beta: float = 0.25):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = tuple(patch_nums)
        # Codebook usage per scale (an EMA of hit counts); training statistics, kept for checkpoint compatibility.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.quant_resi = PhiShared(z_channels, phi_ratio, num_phis)
        self.embedding = nn.Embedding(vocab_size, z_channels)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, self.num_scales)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector (L2) for each row of z (N, Cvae)."""
        codebook = self.embedding.weight.detach().float()
        dist = z_NC.square().sum(1, keepdim=True) + codebook.square().sum(1)
        dist.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
        return dist.argmin(dim=1)

    def _upsample(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Token-map embeddings to the full latent size (bicubic), except the last scale, then phi."""
        side = self.patch_nums[-1]
        if si != self.num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        return self.phi(si)(h_BChw)

    def _scale_input(self, f_rest: torch.Tensor, si: int) -> torch.Tensor:
        """The residual as scale si looks it up: area-resized to (B, Cvae, pn, pn), the last scale as is."""
        pn = self.patch_nums[si]
        return f_rest if si == self.num_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")

    def _quantize_scale(self, f_rest: torch.Tensor, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of the residual at scale si (area-resized, except the last scale) and their
        contribution h to f_hat: (indices (B*pn*pn,), h (B, Cvae, H, W))."""
        B, C = f_rest.shape[:2]
        pn = self.patch_nums[si]
        z = self._scale_input(f_rest, si)
        idx_N = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
        return idx_N, self._upsample(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si)

    def codes_to_embed(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """(B, pn*pn) indices -> (B, Cvae, pn, pn) code vectors."""
        B, n = idx_Bl.shape
        pn = round(n ** 0.5)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.z_channels, pn, pn)

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor, return_fhat: bool = False) -> list[torch.Tensor]:
        """Latent -> list of token maps (B, pn*pn), or the cumulative f_hat after every scale (fp32, as
        ``forward``)."""
        f_rest = f_BChw.detach().float().clone()
        B = f_rest.shape[0]
        f_hat = torch.zeros_like(f_rest)
        out = []
        with torch.autocast(f_rest.device.type, enabled=False):
            for si, pn in enumerate(self.patch_nums):
                idx_N, h = self._quantize_scale(f_rest, si)
                f_hat.add_(h)
                f_rest.sub_(h)
                out.append(f_hat.clone() if return_fhat else idx_N.view(B, pn * pn))
        return out

    @torch.no_grad()
    def residual_inputs(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """What the nearest-code lookup sees at every scale: the residual, area-resized to (B, Cvae, pn, pn)."""
        f = f_BChw.float()
        before = [torch.zeros_like(f), *self.f_to_idx(f, return_fhat=True)[:-1]]  # f_hat before each scale
        return [self._scale_input(f - fh, si) for si, fh in enumerate(before)]

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for the transformer: (B, L - 1, Cvae) float32, the area-resized cumulative
        f_hat before every scale after the first."""
        inputs = [F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                  for f_hat, pn in zip(self.idx_to_fhat(idx_list[:-1]), self.patch_nums[1:])]
        return torch.cat(inputs, dim=1)

    def next_ar_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation step: add scale ``si``'s code map to f_hat (in place, float32) and return
        (f_hat, the input map for scale si+1) — for the last scale the input is f_hat itself."""
        f_hat.add_(self._upsample(h_BChw.float(), si))
        if si == self.num_scales - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cumulative f_hat after each given scale (a prefix of the schedule is fine)."""
        B, side = idx_list[0].shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(B, self.z_channels, side, side, device=idx_list[0].device)
        out = []
        for si, idx in enumerate(idx_list):
            f_hat.add_(self._upsample(self.codes_to_embed(idx).float(), si))
            out.append(f_hat.clone())
        return out

    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VQ-VAE training: (f_hat with a straight-through gradient, VQ loss averaged over scales,
        codebook hits per scale (S, V)). Runs in fp32 even under autocast, as VAR's quantizer: in bf16 the
        small residuals of the later scales drown in rounding (measured on shapes, configs/shapes_vqvae.json,
        500 steps, bf16 autocast: 22.9 dB and every object's colour lost; with this, 26.7 dB, as fp32)."""
        f = f_BChw.float()
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        vq_loss = f.new_zeros(())
        hits = torch.zeros(self.num_scales, self.vocab_size, device=f.device)
        with torch.autocast(f.device.type, enabled=False):
            for si in range(self.num_scales):
                idx_N, h = self._quantize_scale(f_rest, si)
                hits[si] = idx_N.bincount(minlength=self.vocab_size).float()
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                # commitment (encoder towards f_hat) + codebook/phi (f_hat towards the encoder output)
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
        vq_loss = vq_loss / self.num_scales
        f_hat_st = (f_hat.detach() - f_no_grad) + f  # straight-through estimator
        return f_hat_st, vq_loss, hits
