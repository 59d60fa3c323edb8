"""The STAR transformer: next-scale prediction conditioned on text, and its KV-cached generation.

Sequence layout (L = sum pn_s^2 tokens, scale by scale, row-major inside a scale):
    token 0            = encoder_proj(pooled text) + pos_start + lvl_embed[0]        (the start token)
    tokens of scale s  = word_embed(area-resized f_hat of scales < s) + lvl_embed[s]
Block:  x += DropPath(SelfAttn(LN(x)))    block-causal over scales, normalized 2D RoPE, QK-norm
        x += CrossAttn(LN(x), text)       per sample (or row 0 broadcast: ``legacy_cross_attn_batch0``)
        x += DropPath(FFN(LN(x)))
Head:   logits = head_logits(LN(x))       (LN without affine parameters, eps 1e-6)

Module and parameter names are the official ones, so official state dicts load with ``strict=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, KVCache, SelfAttention
from models.linear import Linear
from models.rope import rope_angles
from models.sampling import Generators, draw_per_group, guidance_weights, sample_tokens
from models.vqvae import VQVAE
from utils.config import ConfigError, check_range

if TYPE_CHECKING:  # imported where used: the module costs ~0.6 s at start-up
    from torch.nn.attention.flex_attention import BlockMask

ATTENTION_KERNELS = ("sdpa", "flex")


@dataclass
class StarConfig:
    depth: int = 16
    width: int = 0                 # 0 -> 64 * depth
    num_heads: int = 0             # 0 -> depth
    mlp_ratio: float = 4.0
    vocab_size: int = 4096
    z_channels: int = 32           # Cvae of the VQ-VAE
    text_dim: int = 1024           # text encoder hidden size (SD 2.1 CLIP: 1024)
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    rope: bool = True              # False: learned absolute position embedding pos_1LC (paper ablation)
    rope_theta: float = 10000.0
    rope_norm: float = 64.0
    qk_norm: bool = True
    cross_attn: bool = True
    head_norm: bool = True         # LayerNorm before head_logits (official ``logit_norm``)
    drop_path_rate: float = -1.0   # -1 -> 0.1 * depth / 24, as official
    norm_eps: float = 1e-6
    legacy_class_emb: bool = True  # keep the unused VAR class_emb (1001 rows) so official files load strictly
    # Official behaviours, off by default (see README "Compatibility switches"):
    legacy_cross_attn_batch0: bool = False  # every row gets batch row 0's cross-attention (released weights)
    legacy_fhat_half: bool = False          # accumulate f_hat in the autocast dtype during generation

    def __post_init__(self) -> None:
        self.patch_nums = tuple(self.patch_nums)
        if self.width == 0:
            self.width = 64 * self.depth
        if self.num_heads == 0:
            self.num_heads = self.depth
        if self.drop_path_rate < 0:
            self.drop_path_rate = 0.1 * self.depth / 24

    def validate(self) -> None:
        for name in ("depth", "width", "num_heads", "vocab_size", "z_channels", "text_dim"):
            check_range(name, getattr(self, name), 1)
        check_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0, below_high=True)
        for name in ("mlp_ratio", "rope_theta", "rope_norm", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ConfigError(f"width {self.width} must split into {self.num_heads} heads of a size divisible by 4")
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] != 1:
            raise ConfigError(f"patch_nums must start at 1 and increase strictly, got {self.patch_nums}")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class DropPath(nn.Module):
    """Stochastic depth per sample, rescaled by 1/keep."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: StarConfig, drop_path: float, with_cross: bool):
        super().__init__()
        C = cfg.width
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)  # one LN, used three times
        self.attn = SelfAttention(C, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(C, cfg.text_dim, cfg.num_heads, cfg.qk_norm) if with_cross else None
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.legacy_batch0 = cfg.legacy_cross_attn_batch0

    def forward(self, x: torch.Tensor, rope, attn_mask=None, cache: KVCache | None = None,
                text_kv=None, text_bias=None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln(x), rope, attn_mask, cache))
        if self.cross_attn is not None and text_kv is not None:
            if self.legacy_batch0:  # the official ``cross_attn(...)[0]``: row 0's result for every row
                k, v = text_kv
                ca = self.cross_attn(self.ln(x[:1]), (k[:1], v[:1]), None if text_bias is None else text_bias[:1])
            else:
                ca = self.cross_attn(self.ln(x), text_kv, text_bias)
            x = x + ca
        return x + self.drop_path(self.ffn(self.ln(x)))


class STAR(nn.Module):
    def __init__(self, cfg: StarConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, S, L = cfg.width, len(cfg.patch_nums), cfg.seq_len
        self.num_scales = S
        # Registration order = official state_dict order.
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        if not cfg.rope:
            self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.word_embed = Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(1001, C) if cfg.legacy_class_emb else None  # unused; kept for loading
        if self.class_emb is not None:
            self.class_emb.weight.requires_grad_(False)  # never in the graph: no optimizer state, no DDP error
        self.lvl_embed = nn.Embedding(S, C)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList([Block(cfg, dpr[i], cfg.cross_attn) for i in range(cfg.depth)])
        self.head_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False) if cfg.head_norm else nn.Identity()
        self.head_logits = Linear(C, cfg.vocab_size)
        self.encoder_proj = Linear(cfg.text_dim, C)

        # Constants as non-persistent buffers, so .to(device) moves them and checkpoints stay official-shaped.
        begins = [0]
        for pn in cfg.patch_nums:
            begins.append(begins[-1] + pn * pn)
        self.scale_begins = begins  # begin index of every scale, plus L
        level = torch.cat([torch.full((pn * pn,), s) for s, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("level_ids", level, persistent=False)  # (L,) scale index of each token
        angles = rope_angles(cfg.patch_nums, cfg.head_dim, cfg.rope_theta, cfg.rope_norm)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)  # (L, hd/2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.activation_checkpointing = False  # set_activation_checkpointing
        self.attention_kernel = "sdpa"          # set_attention_kernel
        self._flex_masks: dict[str, BlockMask] = {}  # the full-sequence BlockMask per device

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Training: keep only each block's input and recompute the block in the backward pass. Activation
        memory falls from ~depth blocks' worth to ~one block's (plus the block inputs), for one more forward
        pass of the blocks (~1/3 more compute). Gradients are unchanged (drop-path draws are replayed)."""
        self.activation_checkpointing = enabled

    def set_attention_kernel(self, kernel: str) -> None:
        """Training self-attention: ``sdpa`` (a dense bool mask) or ``flex`` (FlexAttention with a block mask, which
        skips the score blocks the block-causal mask hides entirely; compiled, CUDA only for training, as
        PyTorch has no CPU backward for it). Generation is unaffected (its KV cache needs no mask)."""
        if kernel not in ATTENTION_KERNELS:
            raise ConfigError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        self.attention_kernel = kernel

    # --- init ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_std: float = -1.0, head_scale: float = 0.02) -> None:
        """The official initialisation (``init_weights`` with ``ini=-1``, ``hd=0.02``)."""
        std = math.sqrt(1 / self.cfg.width / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2.0, b=2.0)  # absolute bounds, as official
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std, a=-2.0, b=2.0)
        if not self.cfg.rope:
            nn.init.trunc_normal_(self.pos_1LC, std=std, a=-2.0, b=2.0)
        self.head_logits.weight.mul_(head_scale)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.cfg.depth))

    # --- pieces shared by training and generation -------------------------------------------------------------
    def rope_slice(self, begin: int, end: int):
        return (self.rope_cos[begin:end], self.rope_sin[begin:end]) if self.cfg.rope else None

    def start_tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, Dt) pooled text -> (B, 1, C) start token incl. level-0 (and absolute position) embedding."""
        x = self.encoder_proj(pooled.float()).unsqueeze(1) + self.pos_start
        return x + self.position_embed(0, 1)

    def position_embed(self, begin: int, end: int) -> torch.Tensor:
        """Level embedding (+ absolute PE without RoPE) of tokens begin..end-1: (1, end-begin, C)."""
        emb = self.lvl_embed(self.level_ids[begin:end]).unsqueeze(0)
        return emb + self.pos_1LC[:, begin:end] if not self.cfg.rope else emb

    def text_inputs(self, hidden: torch.Tensor, mask: torch.Tensor):
        """Per-block text keys/values and the additive padding bias (B, 1, 1, Lt)."""
        if not self.cfg.cross_attn:
            return [None] * len(self.blocks), None
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill(mask == 0, float("-inf"))[:, None, None, :]
        hidden = hidden.float()
        return [b.cross_attn.text_kv(hidden) for b in self.blocks], bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.head_norm(x.float())).float()

    def block_causal_mask(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (L, L): token i sees token j iff scale(i) >= scale(j). ``keep`` selects kept tokens."""
        lvl = self.level_ids if keep is None else self.level_ids[keep]
        return lvl[:, None] >= lvl[None, :]

    def flex_block_mask(self, keep: torch.Tensor | None = None) -> BlockMask:
        """``block_causal_mask`` as a FlexAttention ``BlockMask`` (built once per device without ``keep``)."""
        lvl = self.level_ids if keep is None else self.level_ids[keep]
        key = str(lvl.device)
        if keep is None and key in self._flex_masks:
            return self._flex_masks[key]
        from torch.nn.attention.flex_attention import create_block_mask
        n = lvl.shape[0]
        mask = create_block_mask(lambda b, h, q, kv: lvl[q] >= lvl[kv], None, None, n, n, device=lvl.device)
        if keep is None:
            self._flex_masks[key] = mask
        return mask

    # --- training forward -------------------------------------------------------------------------------------
    def forward(self, var_input: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                text_pooled: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass.

        var_input (B, L-1, Cvae) from ``VQVAE.idx_to_var_input``; text (B, Lt, Dt), mask (B, Lt), pooled (B, Dt).
        ``keep`` (L,) optional bool/index of kept tokens (token dropping at high resolution).
        Returns logits (B, L', V) and the last hidden state (B, L', C) for the kept tokens L'.
        """
        L = self.cfg.seq_len
        x = torch.cat((self.start_tokens(text_pooled),
                       self.word_embed(var_input.float()) + self.position_embed(1, L)), dim=1)
        cos, sin = self.rope_cos, self.rope_sin
        if keep is not None:
            x, cos, sin = x[:, keep], cos[keep], sin[keep]
        rope = (cos, sin) if self.cfg.rope else None
        mask = self.flex_block_mask(keep) if self.attention_kernel == "flex" else self.block_causal_mask(keep)
        text_kvs, text_bias = self.text_inputs(text_hidden, text_mask)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block, text_kv in zip(self.blocks, text_kvs):
            if recompute:
                x = checkpoint(block, x, rope, mask, None, text_kv, text_bias, use_reentrant=False)
            else:
                x = block(x, rope, mask, None, text_kv, text_bias)
        return self.logits(x), x

    # --- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, vqvae: VQVAE, text_hidden: torch.Tensor, text_mask: torch.Tensor, text_pooled: torch.Tensor,
                 cfg: float = 4.0, guidance: str | list[float] = "linear", top_k: int = 0, top_p: float = 0.0,
                 gumbel_smooth: bool = False, generator: Generators = None,
                 sampler=None, sampler_schedule="default", sampler_cfg: float | None = None,
                 sampler_noise=None, sampler_step_callback=None, keep_tokens=None, keep=None,
                 return_tokens: bool = False, return_logits: bool = False, scale_callback=None):
        """Generate B images scale by scale with a KV cache and classifier-free guidance.

        Text tensors have 2B rows: rows 0..B-1 the prompts, rows B..2B-1 the unconditional ("" or negative)
        prompt. Guidance at scale s: logits = (1+t_s) cond - t_s uncond with t_s from ``guidance_weights``.
        Returns images (B, 3, H, W) in [0, 1]; with ``return_tokens`` also the token maps [(B, pn^2)], with
        ``return_logits`` also the guided logits per scale (of the backbone). ``generator``: one for the batch
        (as official), or a list of G generators, generator i drawing for images i*B/G .. (i+1)*B/G - 1 only.

        ``sampler``: a ``SamplerHead``; scales from its ``sample_from`` on are filled by masked refinement
        (``sampler_schedule``: a name of ``models.sampler.SCHEDULES`` or a ``MaskSchedule``), its logits
        guided with the constant weight ``sampler_cfg`` (default ``cfg``, as official). ``sampler_noise``
        replaces the source of random positions (parity checks replay the official RNG stream with it);
        ``sampler_step_callback(step, idx, committed)`` observes every refinement step.

        Editing: ``keep_tokens`` and ``keep`` (lists of (B, pn^2) per scale) force token ``keep_tokens[s]``
        wherever ``keep[s]`` is True (teacher forcing of the known region at every scale).
        """
        B2 = text_hidden.shape[0]
        if B2 % 2:
            raise ValueError(f"text tensors need 2B rows (prompts then unconditional), got {B2}")
        B, S = B2 // 2, self.num_scales
        weights = guidance_weights(guidance, cfg, S)
        # After the last guided scale nothing needs the unconditional rows: drop them.
        last_guided = max([s for s, t in enumerate(weights) if t != 0.0], default=-1)
        sampler_cfg = cfg if sampler_cfg is None else sampler_cfg
        if sampler is not None and sampler_cfg != 0.0:
            last_guided = S - 1  # the head needs the unconditional rows on its scales
        codebook = vqvae.quantize.embedding.weight
        side = self.cfg.patch_nums[-1]
        dtype = torch.get_autocast_dtype(text_hidden.device.type) if (
            self.cfg.legacy_fhat_half and torch.is_autocast_enabled(text_hidden.device.type)) else torch.float32
        f_hat = torch.zeros(B, self.cfg.z_channels, side, side, device=text_hidden.device, dtype=dtype)

        text_kvs, text_bias = self.text_inputs(text_hidden, text_mask)
        x = self.start_tokens(text_pooled)
        caches = [KVCache(B2, self.cfg.num_heads, self.cfg.seq_len, self.cfg.head_dim, x.device, x.dtype)
                  for _ in self.blocks]
        tokens, guided_logits = [], []
        rows = B2
        for si, pn in enumerate(self.cfg.patch_nums):
            if rows == B2 and si > last_guided:  # guidance over: continue with the conditional rows only
                rows = B
                x = x[:B]
                for c in caches:
                    c.keep_rows(B)
                text_kvs = [None if kv is None else (kv[0][:B], kv[1][:B]) for kv in text_kvs]
                text_bias = None if text_bias is None else text_bias[:B]
            rope = self.rope_slice(self.scale_begins[si], self.scale_begins[si + 1])
            for block, cache, text_kv in zip(self.blocks, caches, text_kvs):
                x = block(x, rope, None, cache, text_kv, text_bias)
            logits = self.logits(x)
            t = weights[si]
            if rows == B2:
                logits = (1 + t) * logits[:B] - t * logits[B:]
            if return_logits:
                guided_logits.append(logits.clone())
            if sampler is not None and si >= sampler.sample_from:
                known = None if keep is None else (keep_tokens[si], keep[si])
                idx = sampler.sample_scale(self, si, x, logits, text_pooled[:rows], codebook, sampler_cfg,
                                           top_k, top_p, sampler_schedule, generator, sampler_noise,
                                           sampler_step_callback, known)
                h = codebook[idx]
            elif gumbel_smooth:
                ratio = si / max(S - 1, 1)
                soft = _gumbel_softmax(logits.mul(1 + ratio), max(0.27 * (1 - 0.95 * ratio), 0.005), generator)
                h = soft @ codebook
                idx = soft.argmax(-1)
            else:
                idx = sample_tokens(logits, top_k, top_p, generator)
                h = codebook[idx]
            if keep is not None:
                idx = torch.where(keep[si], keep_tokens[si], idx)
                h = torch.where(keep[si].unsqueeze(-1), codebook[idx], h)
            tokens.append(idx)
            h = h.transpose(1, 2).reshape(B, self.cfg.z_channels, pn, pn)
            f_hat, next_map = vqvae.quantize.next_ar_input(si, f_hat, h.to(f_hat.dtype))
            if scale_callback is not None:
                scale_callback(si)
            if si + 1 < S:
                begin, end = self.scale_begins[si + 1], self.scale_begins[si + 2]
                x = self.word_embed(next_map.float().flatten(2).transpose(1, 2)) + self.position_embed(begin, end)
                x = x.repeat(rows // B, 1, 1)
        device_type = f_hat.device.type
        with torch.autocast(device_type, enabled=False):
            img = vqvae.fhat_to_img(f_hat.float()).add_(1).mul_(0.5)
        out = (img,)
        if return_tokens:
            out += (tokens,)
        if return_logits:
            out += (guided_logits,)
        return out[0] if len(out) == 1 else out


def _gumbel_softmax(logits: torch.Tensor, tau: float, generator: Generators) -> torch.Tensor:
    gumbels = -draw_per_group(generator, logits.shape[0],
                              lambda g, a, b: torch.empty_like(logits[a:b]).exponential_(generator=g)).log()
    return ((logits + gumbels) / tau).softmax(-1)
