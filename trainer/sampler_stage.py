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

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import save_pretrained
from models.sampler import SamplerHead, visible_probability
from trainer.config import RunConfig
from trainer.loop import host_values
from trainer.optim import with_ema_weights
from trainer.star_stage import StarStage, load_init_weights


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
