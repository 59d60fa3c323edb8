"""Analytic FLOP counts (multiply-add = 2 FLOPs; softmax, norms and elementwise ops ignored).

Generation of a batch of B images with guidance runs R = 2B rows through the transformer per scale
(B after the last guided scale). For a scale with n tokens, c tokens of context (all scales so far), width C,
text length T, text width D, vocab V, depth d and FFN hidden F:
    per block: self-attn projections 2*n*(3C*C + C*C) + scores/values 2*2*n*c*C
               cross-attn q/proj 2*n*2C*C + scores/values 2*2*n*T*C
               FFN 2*n*2*C*F
    head: 2*n*C*V;  start token: 2*D*C per row;  word_embed of scales 1..S-1: 2*n*Cvae*C on B rows
    once per generation: text keys/values 2*T*D*2C per block and row.
Not counted: the VQ-VAE (its phi convs during generation are < 0.1% at d16; the decoder is timed separately).
Checked against torch's FlopCounterMode (tests/test_bench.py).
"""
from __future__ import annotations

from models.star import StarConfig


def star_generation_flops(cfg: StarConfig, batch: int, text_len: int = 77, guided_scales: int | None = None) -> int:
    C, d, V, D = cfg.width, cfg.depth, cfg.vocab_size, cfg.text_dim
    F = round(C * cfg.mlp_ratio)
    S = len(cfg.patch_nums)
    guided_scales = S if guided_scales is None else guided_scales
    total, context = 0, 0
    T = text_len if cfg.cross_attn else 0
    for si, pn in enumerate(cfg.patch_nums):
        n = pn * pn
        rows = 2 * batch if si < guided_scales else batch
        context += n
        block = 2 * n * 4 * C * C + 4 * n * context * C + 2 * n * 2 * C * F
        if cfg.cross_attn:
            block += 2 * n * 2 * C * C + 4 * n * T * C
        total += rows * (d * block + 2 * n * C * V)
        if si > 0:
            total += batch * 2 * n * cfg.z_channels * C
    total += 2 * batch * (2 * D * C + (d * 2 * T * D * 2 * C if cfg.cross_attn else 0))
    return int(total)

