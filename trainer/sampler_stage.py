"""Sampler-head training step: frozen VQ-VAE, text encoder and STAR backbone; only the head learns.

Per sample a visible fraction p = arccos(r)/(pi/2), r ~ U(0, 1), is drawn and each token of the sampler scales
is visible with probability p (the official masking); the head sees the code vectors of visible tokens (0 for
hidden ones) and the backbone's last hidden states, and is trained with cross-entropy on the hidden tokens.
The loss is the mean over hidden tokens (the official code scales the sum by 1/L of the whole pyramid and adds
a constant term for visible tokens; neither changes the gradient direction).

The head is the loop's model, so with several ranks it is wrapped in DDP and its gradients are all-reduced
(the official script calls the head past the DDP wrapper, so its ranks never synchronise).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_vqvae_for, read_config, save_pretrained
from models.sampler import SamplerHead, visible_probability
from trainer.config import RunConfig
from trainer.loop import host_values
from trainer.optim import with_ema_weights
from trainer.star_stage import (
    StarStage,
    load_init_weights,
    same_tokenizer,
    settings_differences,
    warn_if_text_path_differs,
)
from utils.config import ConfigError


def with_backbone_settings(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``star_train.vqvae`` taken from the backbone directory when unset, after checking that the run's
    architecture, text encoder and VQ-VAE are the ones the backbone was trained with.

    A head learns to read the backbone's hidden states for the backbone's tokens and text features: given another
    tokenizer or encoder it would train without error and sample garbage. Our backbone directories record all
    three (config.json, vqvae.safetensors); an official ``.pth`` records none, so then the run's settings are
    taken as given and ``star_train.vqvae`` is required."""
    backbone = Path(cfg.sampler_train.backbone)
    if not backbone.exists():  # else the first complaint would be about its missing VQ-VAE
        raise FileNotFoundError(f"sampler_train.backbone={backbone} not found: pass the STAR run's exported "
                                "directory (<loop.out_dir>/final) or an official .pth")
    recorded = read_config(backbone) if backbone.is_dir() else {}
    if backbone.is_dir() and "star" not in recorded:  # e.g. the VQ-VAE run's directory
        raise ConfigError(f"sampler_train.backbone={backbone} holds no STAR model (its config.json has no 'star' "
                          "section): pass the STAR run's exported directory (<loop.out_dir>/final)")
    differences = settings_differences(recorded, cfg, ("model", "text"))
    if differences:
        listed = "; ".join(f"{section}.{key}: backbone {theirs!r}, this run {ours!r}"
                           for section, key, theirs, ours in differences)
        flags = " ".join(f"--{section}.{key}={_flag_value(theirs)}" for section, key, theirs, _ in differences)
        raise ConfigError(f"sampler_train.backbone={backbone} was trained with other settings than this run's "
                          f"({listed}); a head only fits the backbone's own. Use: {flags}")
    warn_if_text_path_differs(recorded, cfg, "the backbone")
    if "vqvae" not in recorded:  # an official .pth, or a directory exported without its tokenizer
        if not cfg.star_train.vqvae:
            raise ConfigError(f"sampler_train.backbone={backbone} brings no VQ-VAE: set --star_train.vqvae (the "
                              f"tokenizer the backbone was trained with)")
        return cfg
    if not cfg.star_train.vqvae:
        return dataclasses.replace(cfg, star_train=dataclasses.replace(cfg.star_train, vqvae=str(backbone)))
    if not same_tokenizer(load_vqvae_for(cfg.star_train.vqvae, cfg.model.patch_nums), backbone, cfg.model.patch_nums):
        raise ConfigError(f"star_train.vqvae={cfg.star_train.vqvae} is not the VQ-VAE the backbone was trained "
                          f"with ({backbone / 'vqvae.safetensors'}): leave star_train.vqvae empty "
                          f"(--star_train.vqvae=) to use the backbone's")
    return cfg


def _flag_value(value) -> str:
    """How ``--section.key=`` takes ``value`` (utils.config reads JSON first, then text)."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value if isinstance(value, str) else json.dumps(value)


class SamplerStage(StarStage):
    def __init__(self, cfg: RunConfig, device: torch.device):
        super().__init__(cfg, device)
        backbone = self.model
        load_init_weights(backbone, cfg.sampler_train.backbone)
        self.backbone = backbone.to(device).eval().requires_grad_(False)
        sc, S = cfg.sampler_train, len(cfg.model.patch_nums)
        self.model = SamplerHead(cfg.model, sample_from=sc.sample_from % S, num_blocks=sc.num_blocks)
        self.model.init_weights()
        if sc.init_from_backbone:
            self.model.init_from_backbone(self.backbone)
        begin = self.backbone.scale_begins[self.model.sample_from]
        self.begin = begin
        self.levels = self.backbone.level_ids[begin:]
        self.rope = self.model.rope_for(self.backbone, begin, self.backbone.cfg.seq_len)
        self.attn_mask = self.model.training_mask(self.backbone)

    def loss(self, model: nn.Module, batch: dict):
        return self.masked_loss(model, batch, self.token_cache)

    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, float]:
        """Validation: the training loss and ``acc_hidden`` (the loop fixes the RNG, so every evaluation hides the
        same tokens)."""
        loss, metrics = self.masked_loss(model, batch, self.val_token_cache)
        return {"loss": loss.item(), "acc_hidden": metrics["acc_hidden"]}

    def masked_loss(self, model: nn.Module, batch: dict, cache) -> tuple[torch.Tensor, dict[str, float]]:
        gt, var_input = self.tokens(batch, cache)
        text_hidden, text_mask, pooled = self.text_features(batch)
        with torch.no_grad():
            _, hidden = self.backbone(var_input, text_hidden, text_mask, pooled)
        target, hidden = gt[:, self.begin:], hidden[:, self.begin:]
        B, n = target.shape
        # Global RNG: restored exactly on resume by the loop's checkpoints.
        visible = torch.rand(B, n, device=self.device) < visible_probability(torch.rand(B, 1, device=self.device))
        codes = self.vqvae.quantize.embedding.weight[target] * visible.unsqueeze(-1)
        logits = model(codes, self.levels, hidden, pooled, self.rope, self.attn_mask)
        hidden_tokens = ~visible
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view(B, n)
        count = hidden_tokens.sum()
        loss = (ce * hidden_tokens).sum() / count.clamp_min(1)
        with torch.no_grad():
            correct = (logits.argmax(-1) == target) & hidden_tokens
            metrics = host_values({"acc_hidden": correct.sum() / count.clamp_min(1),
                                   "visible_fraction": visible.float().mean(), "tokens": count})
        return loss, metrics

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        st = self.cfg.star_train
        hidden, mask, pooled = (t.to(self.device) for t in self.text.encode(list(prompts) + [""] * len(prompts)))
        gen = torch.Generator(self.device).manual_seed(seed)
        return self.backbone.generate(self.vqvae, hidden, mask, pooled, cfg=st.sample_cfg, guidance=st.sample_guidance,
                                      top_k=st.sample_top_k, top_p=st.sample_top_p, generator=gen, sampler=self.model,
                                      sampler_schedule=self.cfg.sampler_train.schedule)

    def export(self, out_dir: Path, ema_state: dict | None) -> None:
        save_pretrained(out_dir, star=self.backbone, vqvae=self.vqvae, sampler=with_ema_weights(self.model, ema_state),
                        extra_config=self.pipeline_config())
