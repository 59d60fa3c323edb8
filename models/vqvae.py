"""Multi-scale VQ-VAE (VAR layout): conv encoder/decoder around the residual quantizer of ``quant.py``.

The default ``VQVAEConfig`` builds exactly the released ``vae_ch160v4096z32.pth`` (108,948,355 parameters,
identical key names and shapes), so the official file loads with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.conv import Conv2d
from models.quant import MultiScaleQuantizer
from utils.config import ConfigError, check_range

PATCH_NUMS = {
    "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32          # Cvae: channels of the latent and of the code vectors
    ch: int = 160                 # base width of encoder/decoder
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # downsampling factor 2**(len-1)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = PATCH_NUMS["256"]
    num_phis: int = 4             # shared phi convs (official share_quant_resi)
    phi_ratio: float = 0.5        # official quant_resi
    beta: float = 0.25            # commitment weight (training only)
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("vocab_size", "z_channels"):
            check_range(name, getattr(self, name), 1)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult must be a non-empty list of widths >= 1, got {self.ch_mult}")
        check_range("phi_ratio", self.phi_ratio, -1.0, 1.0)  # its magnitude is used, as VAR's quant_resi
        check_range("beta", self.beta, 0.0)
        check_range("dropout", self.dropout, 0.0, 1.0, below_high=True)
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or not self.patch_nums or self.patch_nums[0] < 1:
            raise ConfigError(f"patch_nums must be positive and strictly increasing, got {self.patch_nums}")
        if self.ch % 32:
            raise ConfigError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {self.ch}")
        if self.num_phis < 1:
            raise ConfigError(f"num_phis must be >= 1, got {self.num_phis}")
        if self.num_res_blocks < 1:  # the encoder's first res-block of a level is what changes its width
            raise ConfigError(f"num_res_blocks must be >= 1 (VAR layout), got {self.num_res_blocks}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _silu_of(h: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh intermediate ``h``: in place when no autograd graph is recorded (the same numbers, without
    allocating another full-size map: GroupNorm + SiLU at 160 x 256^2 on the CPU 50 -> 31 ms)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        # Registration order = official state_dict order.
        self.norm1, self.norm2 = _norm(c_in), _norm(c_out)
        self.conv1 = Conv2d(c_in, c_out, 3, 1, 1)  # Conv2d: Winograd for wide maps in CPU inference
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_silu_of(self.norm1(x)))
        h = self.conv2(self.dropout(_silu_of(self.norm2(h))))
        if torch.is_grad_enabled():
            return self.nin_shortcut(x) + h
        return h.add_(self.nin_shortcut(x))  # no graph: add into the fresh conv output (the same sum, bit for bit)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (fused 1x1 qkv conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Explicit bmm/softmax (not SDPA): bit-identical to the official decoder; the map is at most 16x16
        # (256 tokens) in the released model, so this costs nothing measurable.
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)       # each (B, C, HW)
        attn = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)    # (B, HW_q, HW_k)
        h = torch.bmm(v, attn.transpose(1, 2))                                    # (B, C, HW_q)
        return x + self.proj_out(h.view(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as the official code


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (only at the lowest resolution), resampler."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(c_out) for _ in range(n_blocks)] if with_attn else [])

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            level = _Level(c_in, c_out, cfg.num_res_blocks, with_attn=(i == n - 1), dropout=cfg.dropout)
            if i != n - 1:
                level.downsample = Downsample2x(c_out)
            self.down.append(level)
            c_in = c_out
        self.mid = _Mid(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_silu_of(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in, cfg.dropout)
        levels = []
        for i in reversed(range(n)):
            level = _Level(c_in, widths[i], cfg.num_res_blocks + 1, with_attn=(i == n - 1), dropout=cfg.dropout)
            if i != 0:
                level.upsample = Upsample2x(widths[i])
            levels.insert(0, level)
            c_in = widths[i]
        self.up = nn.ModuleList(levels)  # indexed by level, as the official checkpoint
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_silu_of(self.norm_out(h)))


class VQVAE(nn.Module):
    """Image (B,3,H,W) in [-1,1] <-> S token maps. Module names match the official ``VQVAE``."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, cfg.patch_nums, cfg.num_phis,
                                            cfg.phi_ratio, cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    # --- image <-> latent -------------------------------------------------------------------------------------
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous latent f (B, Cvae, pn_last, pn_last)."""
        return self.quant_conv(self.encoder(img))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode f_hat (float32) to an image in [-1, 1]."""
        h = self.post_quant_conv(f_hat.float())
        if h.device.type == "cpu":
            # oneDNN's channels-last convolutions are ~12% faster here for the 256^2 decoder (weights stay NCHW;
            # results differ from NCHW in the last bits only). The Winograd ones (models/conv.py) convert to NCHW;
            # the whole decode takes the same time either way then.
            h = h.contiguous(memory_format=torch.channels_last)
        return self.decoder(h).clamp_(-1, 1)

    # --- the functions around the transformer -----------------------------------------------------------------
    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Image in [-1,1] -> list of S token maps (B, pn_s**2), row-major."""
        return self.quantize.f_to_idx(self.encode(img))

    @torch.no_grad()
    def img_to_fhat(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idx(self.encode(img), return_fhat=True)

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.idx_to_var_input(idx_list)

    @torch.no_grad()
    def idx_to_img(self, idx_list: list[torch.Tensor], every_scale: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Token maps -> image in [-1,1]; with ``every_scale`` the image decoded after each scale."""
        f_hats = self.quantize.idx_to_fhat(idx_list)
        if every_scale:
            return [self.fhat_to_img(f) for f in f_hats]
        return self.fhat_to_img(f_hats[-1])

    # --- VQ-VAE training --------------------------------------------------------------------------------------
    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction in [-1,1] unclamped, VQ loss, codebook hits per scale (S, V), latent f)."""
        f = self.encode(img)
        f_hat, vq_loss, hits = self.quantize(f)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits, f

    # --- loading ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but a per-scale usage buffer of another schedule (e.g. a 10-scale
        checkpoint into a 14-scale model) is replaced by this model's own, as the official loader does."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
