"""The causal-driven stable sampler: a masked-token head on top of a frozen STAR backbone.

For the late scales (index >= ``sample_from``) tokens are not sampled independently from the backbone's
logits but refined MaskGIT-style: a few steps per scale, each predicting every position from the tokens
committed so far and committing a growing (arccos schedule) set of new ones.

Head (official ``enable_adaptive_norm=True`` model; parameter names are the official flat keys):
    text     = encoder_proj2(pooled) + pos_start_last                                  (B, 1, C)
    features = [text ; word_embed_head(code of committed token, 0 if hidden) + lvl_embed_2[scale]]
    prev     = [text ; backbone last hidden state of the same positions]
    f        = head_proj(concat(features, prev))         -> 3 self-attention blocks (QK-norm, RoPE)
    logits   = head_logits2(LN(f))[:, 1:]                 (the text position is dropped)
The text token sits at RoPE position (0, 0); the others at their positions in their scale. In training the
sampler scales are packed into one sequence with a block-diagonal mask (text row/column open).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.linear import Linear
from models.sampling import Generators, draw_per_group, sample_tokens
from models.star import STAR, Block, StarConfig
from utils.config import ConfigError

# Submodule/parameter names of the head: an official full state dict splits on these first components.
HEAD_KEYS = ("pos_start_last", "word_embed_head", "feat_extract_blocks", "head_logits2", "encoder_proj2",
             "head_proj", "lvl_embed_2")


@dataclass(frozen=True)
class MaskSchedule:
    """How one sampler scale is filled.

    steps:          refinement steps; step k commits ``arccos_counts(n, steps)[k]`` new positions.
    random_steps:   the first steps choose the new positions uniformly at random; later steps take the
                    most confident ones (probability of the sampled token).
    backbone_steps: leading steps that sample from the backbone's own logits (ramped guidance) instead of
                    the head; each such step commits twice (by confidence, then by the rule above), as in
                    the official ``'1024'`` version.
    """
    steps: int = 8
    random_steps: int = 5
    backbone_steps: int = 0

    def __post_init__(self):
        if not (self.steps >= 1 and 0 <= self.random_steps and 0 <= self.backbone_steps <= self.steps):
            raise ValueError(f"invalid mask schedule {self}")


SCHEDULES = ("default", "official-1024")


def schedule_for_scale(name: str | MaskSchedule, scale_index: int) -> MaskSchedule:
    """``"default"``: 8 steps, 5 random, all from the head (the official ``sample_version='new'``).
    ``"official-1024"``: the official ``'1024'`` version, keyed on absolute scale indices of the 14-scale
    1024 schedule: 15 steps on scale index > 12, 8 below; scales < 13 take their first 5 steps from the
    backbone."""
    if isinstance(name, MaskSchedule):
        return name
    if name == "default":
        return MaskSchedule()
    if name == "official-1024":
        return MaskSchedule(steps=15 if scale_index > 12 else 8, random_steps=5,
                            backbone_steps=5 if scale_index < 13 else 0)
    raise ConfigError(f"unknown sampler schedule {name!r}; known: {', '.join(SCHEDULES)} (or a MaskSchedule)")


def arccos_counts(n: int, steps: int) -> list[int]:
    """New tokens per step: proportional to arccos(r)/(pi/2) for r = linspace(1, 0, steps), rounded half to
    even, zeros raised to 1, the remainder added to the last step (the official Scheduler).

    On small scales that rule can overshoot n (n=4, 8 steps: seven 1s and a last step of -3; the official
    code only refines large scales). There the scale takes min(n, steps) steps instead, each committing at
    least one token and the rest shared in proportion to the same weights (largest remainders first)."""
    if min(n, steps) == 1:
        return [n]
    w = torch.arccos(torch.linspace(1, 0, steps)) / (math.pi / 2)
    counts = torch.round(w / w.sum() * n).long().clamp_min(1)
    counts[-1] += n - counts.sum()
    if counts[-1] >= 0:
        return counts.tolist()
    steps = min(n, steps)
    w = torch.arccos(torch.linspace(1, 0, steps, dtype=torch.float64)) / (math.pi / 2)
    share = w / w.sum() * (n - steps)  # what is left after one token per step
    counts = 1 + share.floor().long()
    remainder = n - int(counts.sum())
    counts[(share - share.floor()).argsort(descending=True)[:remainder]] += 1
    return counts.tolist()


def visible_probability(r: torch.Tensor) -> torch.Tensor:
    """Training mask rate: each token is visible with probability arccos(r)/(pi/2), r ~ U(0, 1) per sample."""
    return torch.arccos(r) / (math.pi / 2)


class SamplerHead(nn.Module):
    def __init__(self, cfg: StarConfig, sample_from: int, num_blocks: int = 3):
        super().__init__()
        S = len(cfg.patch_nums)
        if not 0 < sample_from < S:
            raise ConfigError(f"sample_from must be a scale index in 1..{S - 1}, got {sample_from}")
        self.cfg, self.sample_from, self.num_blocks = cfg, sample_from, num_blocks
        C = cfg.width
        # Registration order = official state_dict order.
        self.pos_start_last = nn.Parameter(torch.zeros(1, 1, C))
        self.word_embed_head = Linear(cfg.z_channels, C)
        # Drop-path rates of backbone blocks 0, 1, 2 (official), capped at the last block's for shallow backbones.
        dpr = [cfg.drop_path_rate * min(i, cfg.depth - 1) / max(cfg.depth - 1, 1) for i in range(num_blocks)]
        self.feat_extract_blocks = nn.ModuleList([Block(cfg, dpr[i], with_cross=False) for i in range(num_blocks)])
        self.head_logits2 = Linear(C, cfg.vocab_size)
        self.encoder_proj2 = Linear(cfg.text_dim, C)
        self.head_proj = Linear(2 * C, C)
        self.lvl_embed_2 = nn.Embedding(S, C)
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False) if cfg.head_norm else nn.Identity()

    @torch.no_grad()
    def init_weights(self, head_scale: float = 0.02) -> None:
        """The backbone's recipe applied to the head (truncated normal, small output layer, scaled residuals)."""
        std = math.sqrt(1 / self.cfg.width / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start_last, std=std, a=-2.0, b=2.0)
        self.head_logits2.weight.mul_(head_scale)
        for block in self.feat_extract_blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.num_blocks))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.num_blocks))

    @torch.no_grad()
    def init_from_backbone(self, star: STAR) -> None:
        """Start as the backbone's own next-token distribution (not official): head_proj passes the hidden state
        through and ignores the codes, every block's residual branches are zero, head_logits2 is a copy of the
        backbone's head_logits (after the same ``head_norm``), so the head returns the backbone's logits and
        training only has to learn what the committed tokens add. A freshly initialised head first has to relearn
        the backbone's output layer, and within a short run ends up predicting hidden tokens worse than the
        backbone does."""
        C = self.cfg.width
        self.head_proj.weight.zero_()
        self.head_proj.bias.zero_()
        self.head_proj.weight[:, C:].copy_(torch.eye(C))
        for block in self.feat_extract_blocks:
            for linear in (block.attn.proj, block.ffn.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        self.head_logits2.load_state_dict(star.head_logits.state_dict())

    def text_token(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.encoder_proj2(pooled.float()).unsqueeze(1) + self.pos_start_last  # (B, 1, C)

    def forward(self, codes: torch.Tensor, levels: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                rope, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, n, Cvae): code vectors of committed tokens, 0 where hidden; levels (n,) scale index per
        token; hidden (B, n, C) backbone last hidden state; pooled (B, Dt); rope (cos, sin) of the n+1
        positions (text first) or None; attn_mask bool (n+1, n+1). Returns logits (B, n, V)."""
        text = self.text_token(pooled)
        features = torch.cat((text, self.word_embed_head(codes.float()) + self.lvl_embed_2(levels)), dim=1)
        prev = torch.cat((text, hidden.float()), dim=1)
        f = self.head_proj(torch.cat((features, prev), dim=-1))
        for block in self.feat_extract_blocks:
            f = block(f, rope, attn_mask)
        return self.head_logits2(self.norm(f[:, 1:].float())).float()

    # --- pieces for training and generation -------------------------------------------------------------------
    def rope_for(self, star: STAR, begin: int, end: int):
        """RoPE of [text token at (0, 0) ; backbone tokens begin..end-1]."""
        rope = star.rope_slice(0, 1)
        if rope is None:
            return None
        tail = star.rope_slice(begin, end)
        return torch.cat((rope[0], tail[0])), torch.cat((rope[1], tail[1]))

    def training_mask(self, star: STAR) -> torch.Tensor:
        """Bool (n+1, n+1) over [text ; all sampler scales]: attend within a scale, text row/column open."""
        lvl = star.level_ids[star.scale_begins[self.sample_from]:]
        same = lvl[:, None] == lvl[None, :]
        mask = torch.ones(len(lvl) + 1, len(lvl) + 1, dtype=torch.bool, device=lvl.device)
        mask[1:, 1:] = same
        return mask

    @torch.no_grad()
    def sample_scale(self, star: STAR, si: int, hidden: torch.Tensor, backbone_logits: torch.Tensor,
                     pooled: torch.Tensor, codebook: torch.Tensor, cfg: float, top_k: int, top_p: float,
                     schedule: str | MaskSchedule, generator: Generators,
                     position_noise=None, step_callback=None, known: tuple | None = None) -> torch.Tensor:
        """Fill scale ``si`` of B images: hidden (R, n, C) backbone hidden states (R = 2B with the unconditional
        rows, else B), backbone_logits (B, n, V) already guided, pooled (R, Dt). Head logits are guided with
        the constant weight ``cfg``. ``position_noise(shape, generator, device)`` gives the uniform scores of
        the random-position steps (default ``uniform_noise``); ``step_callback(step, idx, committed)`` sees the
        tokens sampled at every step and the committed mask after it. ``known`` = (tokens, keep), each (B, n):
        positions where ``keep`` is True start committed to ``tokens`` (editing). Returns indices (B, n)."""
        position_noise = position_noise or uniform_noise
        schedule = schedule_for_scale(schedule, si)
        R, n, _ = hidden.shape
        B = backbone_logits.shape[0]
        begin, end = star.scale_begins[si], star.scale_begins[si + 1]
        rope = self.rope_for(star, begin, end)
        levels = star.level_ids[begin:end]
        committed = torch.zeros(B, n, dtype=torch.bool, device=hidden.device)
        chosen = torch.zeros(B, n, dtype=torch.long, device=hidden.device)
        if known is not None:
            chosen = torch.where(known[1], known[0], chosen)
            committed |= known[1]

        def commit(new_idx: torch.Tensor, score: torch.Tensor, count: int) -> None:
            pick = torch.zeros_like(committed).scatter_(1, score.topk(count, dim=1).indices, True)
            fresh = pick & ~committed  # committed tokens are never resampled
            chosen[fresh] = new_idx[fresh]
            committed.logical_or_(pick)

        for step, count in enumerate(arccos_counts(n, schedule.steps)):
            if step < schedule.backbone_steps:
                idx, conf = sample_tokens(backbone_logits, top_k, top_p, generator, return_prob=True)
                commit(idx, conf, count)
            else:
                codes = codebook[chosen] * committed.unsqueeze(-1)
                logits = self(codes.repeat(R // B, 1, 1), levels, hidden, pooled, rope)
                if R != B:
                    logits = (1 + cfg) * logits[:B] - cfg * logits[B:]
                idx, conf = sample_tokens(logits, top_k, top_p, generator, return_prob=True)
            if step < schedule.random_steps:
                conf = position_noise(conf.shape, generator, conf.device)
            commit(idx, conf * ~committed, count)
            if step_callback is not None:
                step_callback(step, idx, committed)
        return chosen


def uniform_noise(shape, generator: Generators, device) -> torch.Tensor:
    return draw_per_group(generator, shape[0],
                          lambda g, a, b: torch.rand((b - a, *shape[1:]), generator=g, device=device))


def split_official_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """An official sampler checkpoint (one flat dict) -> (backbone state, head state)."""
    head = {k: v for k, v in state.items() if k.split(".")[0] in HEAD_KEYS}
    backbone = {k: v for k, v in state.items() if k.split(".")[0] not in HEAD_KEYS}
    return backbone, head
