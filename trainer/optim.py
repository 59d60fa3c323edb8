"""AdamW with the official weight-decay groups, LR schedules, and an EMA of weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from trainer.config import OptimConfig

# Parameters whose names contain one of these get no weight decay (official ``filter_params``).
NO_DECAY_NAMES = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                  "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    kwargs = {"fused": True} if cfg.fused else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), **kwargs)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at ``step`` (0-based) of ``total`` optimizer steps."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start + (1 - cfg.warmup_start) * step / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(total - 1 - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return cfg.end_lr + (1 - cfg.end_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    # lin0 (official): flat for the first 5% after warm-up, then linear down to end_lr
    return 1.0 if p < 0.05 else cfg.end_lr + (1 - cfg.end_lr) * (1 - p) / 0.95


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def with_ema_weights(model: nn.Module, ema_state: dict | None) -> nn.Module:
    """``model`` itself without EMA, else a copy of it holding the EMA weights (for export)."""
    if ema_state is None:
        return model
    averaged = copy.deepcopy(model)
    averaged.load_state_dict({**model.state_dict(), **ema_state})
    return averaged
