"""Analytic FLOP counts (multiply-add = 2 FLOPs; softmax, norms and elementwise ops ignored).

Generation of a batch of B images with guidance runs R = 2B rows through the transformer per scale
(B after the last guided scale). For a scale with n tokens, c tokens of context (all scales so far), width C,
text length T, text width D, vocab V, depth d and FFN hidden F:
    per block: self-attn projections 2*n*(3C*C + C*C) + scores/values 2*2*n*c*C
               cross-attn q/proj 2*n*2C*C + scores/values 2*2*n*T*C
               FFN 2*n*2*C*F
    head: 2*n*C*V;  start token: 2*D*C per row;  word_embed of scales 1..S-1: 2*n*Cvae*C on B rows
    once per generation: text keys/values 2*T*D*2C per block and row.
Not counted there: the VQ-VAE (its phi convs during generation are < 0.1% at d16); the decoder that turns f_hat
into the image is ``vqvae_decode_flops``: every convolution 2*k*k*Cin*Cout per output pixel, the attention blocks
of the lowest level 2*HW*(3C*C + C*C) + 2*2*HW*HW*C. That counts direct convolution; the Winograd convolutions
that CPU inference uses for wide maps (models/conv.py) need fewer multiplications for the same result, so a
decode can run at a higher "rate" than a matmul.

A teacher-forced training step (``star_training_flops``) on n tokens per sample (all L, or those kept by token
dropping) runs the same layers with c = n (attention is computed densely under the block-causal mask, as SDPA
does with a mask) on one row per sample, word_embed on the L-1 input tokens and the text keys/values once per
block and sample. The backward pass costs twice the forward for every matmul whose input needs a gradient and
once (weight gradient only) for word_embed, encoder_proj and the text key/value projection, whose inputs are
data. Recomputation by activation checkpointing is not counted (model FLOPs, as in MFU).
All three formulas are checked against torch's FlopCounterMode (tests/test_bench.py).
"""
from __future__ import annotations

from models.star import StarConfig
from models.vqvae import VQVAEConfig


def _block_flops(cfg: StarConfig, n: int, context: int, text_len: int) -> int:
    """One block on n tokens attending to ``context`` tokens and ``text_len`` text tokens (text K/V excluded)."""
    C, F = cfg.width, round(cfg.width * cfg.mlp_ratio)
    flops = 2 * n * 4 * C * C + 4 * n * context * C + 2 * n * 2 * C * F
    if cfg.cross_attn:
        flops += 2 * n * 2 * C * C + 4 * n * text_len * C
    return flops


def _text_kv_flops(cfg: StarConfig, text_len: int) -> int:
    """Cross-attention keys and values of one sample's text, all blocks."""
    return cfg.depth * 2 * text_len * cfg.text_dim * 2 * cfg.width if cfg.cross_attn else 0


def star_training_flops(cfg: StarConfig, batch: int, tokens: int | None = None, text_len: int = 77) -> int:
    """Forward + backward FLOPs of one teacher-forced step on ``batch`` samples of ``tokens`` trained tokens each
    (default: all ``cfg.seq_len``)."""
    L = cfg.seq_len
    n = L if tokens is None else tokens
    T = text_len if cfg.cross_attn else 0
    with_input_grad = cfg.depth * _block_flops(cfg, n, n, T) + 2 * n * cfg.width * cfg.vocab_size
    weight_grad_only = 2 * (L - 1) * cfg.z_channels * cfg.width + 2 * cfg.text_dim * cfg.width + _text_kv_flops(cfg, T)
    return int(batch * (3 * with_input_grad + 2 * weight_grad_only))


def star_generation_flops(cfg: StarConfig, batch: int, text_len: int = 77, guided_scales: int | None = None) -> int:
    C, d, V, D = cfg.width, cfg.depth, cfg.vocab_size, cfg.text_dim
    S = len(cfg.patch_nums)
    guided_scales = S if guided_scales is None else guided_scales
    total, context = 0, 0
    T = text_len if cfg.cross_attn else 0
    for si, pn in enumerate(cfg.patch_nums):
        n = pn * pn
        rows = 2 * batch if si < guided_scales else batch
        context += n
        total += rows * (d * _block_flops(cfg, n, context, T) + 2 * n * C * V)
        if si > 0:
            total += batch * 2 * n * cfg.z_channels * C
    total += 2 * batch * (2 * D * C + _text_kv_flops(cfg, T))
    return int(total)


def vqvae_decode_flops(cfg: VQVAEConfig, batch: int) -> int:
    """``VQVAE.fhat_to_img`` on ``batch`` latents of the last scale's side (post_quant_conv + decoder)."""
    def conv(c_in: int, c_out: int, k: int, side: int) -> int:
        return 2 * k * k * c_in * c_out * side * side

    def res_block(c_in: int, c_out: int, side: int) -> int:
        shortcut = conv(c_in, c_out, 1, side) if c_in != c_out else 0
        return conv(c_in, c_out, 3, side) + conv(c_out, c_out, 3, side) + shortcut

    def attn_block(c: int, side: int) -> int:
        hw = side * side
        return conv(c, 3 * c, 1, side) + conv(c, c, 1, side) + 4 * hw * hw * c

    widths = [cfg.ch * m for m in cfg.ch_mult]
    side, c = cfg.patch_nums[-1], widths[-1]
    total = conv(cfg.z_channels, cfg.z_channels, 3, side) + conv(cfg.z_channels, c, 3, side)
    total += 2 * res_block(c, c, side) + attn_block(c, side)  # the mid block
    for level in reversed(range(len(widths))):  # lowest resolution first, as the decoder runs
        width = widths[level]
        for _ in range(cfg.num_res_blocks + 1):
            total += res_block(c, width, side) + (attn_block(width, side) if level == len(widths) - 1 else 0)
            c = width
        if level:
            side *= 2
            total += conv(width, width, 3, side)  # Upsample2x: nearest, then a 3x3 conv at the new size
    return batch * (total + conv(c, 3, 3, side))
