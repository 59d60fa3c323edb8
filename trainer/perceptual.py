"""LPIPS-style perceptual distance (VGG16 variant) from local weight files; used by the VQ-VAE trainer.

d(x, y) = sum over the VGG16 stages relu1_2 .. relu5_3 of mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), where n
normalises every feature vector to unit length and w_l are LPIPS's learned non-negative channel weights.
Needs two files the user provides (nothing is downloaded): torchvision's VGG16 ImageNet state dict
(``vgg16-397923af.pth``) and the LPIPS linear layers (``vgg.pth`` of the lpips package, keys lin{l}.model.1.weight).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_STAGE_ENDS = (4, 9, 16, 23, 30)  # torchvision vgg16().features indices after relu1_2 .. relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualLoss(nn.Module):
    def __init__(self, vgg_weights: str | Path, lin_weights: str | Path):
        super().__init__()
        from torchvision.models import vgg16
        for path in (vgg_weights, lin_weights):
            if not Path(path).is_file():
                raise FileNotFoundError(f"perceptual loss weights not found: {path} (give local files: torchvision's "
                                        "vgg16-397923af.pth and the lpips package's vgg.pth)")
        vgg = vgg16()
        vgg.load_state_dict(torch.load(vgg_weights, map_location="cpu", weights_only=True))
        self.stages = nn.ModuleList()
        start = 0
        for end in _STAGE_ENDS:
            self.stages.append(nn.Sequential(*vgg.features[start:end]))
            start = end
        lin = torch.load(lin_weights, map_location="cpu", weights_only=True)
        self.lin = nn.ParameterList(
            [nn.Parameter(lin[f"lin{i}.model.1.weight"].reshape(1, c, 1, 1), requires_grad=False)
             for i, c in enumerate(_CHANNELS)])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean distance between image batches in [-1, 1]."""
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(())
        for stage, w in zip(self.stages, self.lin):
            hx, hy = stage(hx), stage(hy)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((nx - ny).pow(2) * w).sum(1).mean()
        return total
