"""Fréchet Inception Distance with pytorch-fid's Inception features.

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). Statistics come from image folders (any size: the Inception
network resizes to 299) or from cached ``.npz`` files with ``mu`` and ``sigma`` (pytorch-fid's format).
The Inception weights (``pt_inception-2015-12-05-6726825d.pth``) are never downloaded here: they are read from a
path you give or from torch's hub cache, where pytorch-fid keeps them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, rows = samples) of (N, D) features in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of two Gaussians. Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of
    S1 S2, which are those of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2): computed that way (eigh), stable
    for singular covariances too."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["mu"], f["sigma"]


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


def find_inception_weights(path: str | Path | None = None) -> Path:
    candidates = [Path(path)] if path else [Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"FID Inception weights not found ({', '.join(map(str, candidates))}). This machine does not download: "
        f"fetch {FID_WEIGHTS_URL} elsewhere and pass its path (--inception-weights), or put it in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}.")


@contextlib.contextmanager
def _hub_dir_holding(weights: Path):
    """pytorch-fid loads its weights through torch.hub's cache; point that cache at ``weights`` for a moment."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        os.symlink(weights.resolve(), Path(tmp) / "checkpoints" / FID_WEIGHTS_NAME)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


class InceptionFeatures:
    """pytorch-fid's InceptionV3 pool3 features (2048-d) of images (N, 3, H, W) in [0, 1]."""

    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        from pytorch_fid.inception import InceptionV3
        with _hub_dir_holding(find_inception_weights(weights)):
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = self.model(images.to(self.device).float())[0]
        return out.flatten(1).cpu().double().numpy()


def fid(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    return frechet_distance(*stats_a, *stats_b)
