"""How well a tokenizer reconstructs images: PSNR, SSIM and codebook usage (images in [0, 1], (N, 3, H, W)).

SSIM is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 for a data range of 1,
population statistics, the SSIM map over the positions where the window fits (no padding), averaged per image
over positions and channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr_db(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their mean squared error (an exact match: 100 dB, MSE floored at
    1e-10)."""
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def psnr_per_image(rec: torch.Tensor, img: torch.Tensor) -> list[float]:
    """PSNR in dB of each reconstruction."""
    return [psnr_db(mse) for mse in (rec.double() - img.double()).pow(2).flatten(1).mean(1).tolist()]


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size, size) weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(rec: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of each reconstruction (float64). Images smaller than the window have no SSIM: ValueError."""
    if min(img.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(img.shape[-2:])}")
    C = img.shape[1]
    window = gaussian_window().to(img.device).expand(C, 1, SSIM_WINDOW, SSIM_WINDOW)
    x, y = rec.double(), img.double()

    def local_mean(t: torch.Tensor) -> torch.Tensor:  # weighted mean over each window position, per channel
        return F.conv2d(t, window, groups=C)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


class CodebookUsage:
    """Counts of every code at every scale over the token maps it is shown (``add``), and what they say."""

    def __init__(self, num_scales: int, vocab_size: int):
        self.counts = torch.zeros(num_scales, vocab_size, dtype=torch.long)

    def add(self, token_maps: list[torch.Tensor]) -> None:
        """``token_maps``: one (N, pn_s^2) tensor of code indices per scale (``VQVAE.img_to_idx``)."""
        for s, idx in enumerate(token_maps):
            self.counts[s] += torch.bincount(idx.flatten().cpu(), minlength=self.counts.shape[1])

    def summary(self) -> dict:
        """Fraction of the codebook in use per scale and over all scales, and the perplexity of the code
        distribution over all scales (exp of its entropy: the number of equally used codes it is worth)."""
        total = self.counts.sum(0)
        p = total.double() / total.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {"used_fraction": (total > 0).double().mean().item(),
                "used_fraction_per_scale": (self.counts > 0).double().mean(1).tolist(),
                "perplexity": math.exp(entropy)}
