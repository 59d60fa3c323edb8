"""CLIP embeddings with open_clip, and the CLIP score as the paper computes it.

CLIP score = mean over image-prompt pairs of cos(image embedding, text embedding) (no x100, no clipping at 0),
prompts truncated to the model's context (77 tokens). The paper uses ViT-L/14; weights come from a local file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def find_clip_weights(weights: str | Path | None, model_name: str) -> Path:
    """The local open_clip checkpoint ``weights``; FileNotFoundError saying what to pass when it is not there."""
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights not found: {weights}. Pass the local open_clip checkpoint of "
                                f"{model_name} (--clip-weights FILE); nothing is downloaded here")
    return Path(weights)


class ClipEmbedder:
    """L2-normalised image and text embeddings of an open_clip model (``model`` built elsewhere, or by name
    from a local weights file)."""

    def __init__(self, model_name: str = "ViT-L-14", weights: str | Path | None = None, model=None,
                 preprocess=None, device: str | torch.device = "cpu"):
        import open_clip
        if model is None:
            weights = find_clip_weights(weights, model_name)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)  # truncates to the context length
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity of paired rows (embeddings need not be normalised)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"{image_emb.shape} image vs {text_emb.shape} text embeddings: pairs needed")
    return F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1).mean().item()


def per_group(values: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Mean of ``values`` per group name and overall (key ``"overall"``)."""
    values = np.asarray(values, dtype=np.float64)
    out = {g: float(values[[i for i, x in enumerate(groups) if x == g]].mean()) for g in sorted(set(groups))}
    out["overall"] = float(values.mean())
    return out
