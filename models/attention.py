"""Self- and cross-attention with QK-norm (cosine attention), RoPE and a preallocated KV cache.

Parameter names follow the official checkpoints (``mat_qkv``, ``mat_q``, ``mat_kv``, ``q_bias``, ``v_bias``,
the zero ``zero_k_bias`` buffer, ``scale_mul_1H11``, ``proj``). All attention goes through
``F.scaled_dot_product_attention`` (``attention``), or FlexAttention when given a ``BlockMask`` (training on
CUDA, ``STAR.set_attention_kernel``); projections through ``models.linear``.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # imported where used: the module costs ~0.6 s at start-up
    from torch.nn.attention.flex_attention import BlockMask

from models.linear import Linear, linear
from models.rope import apply_rope

_MAX_SCALE_LOG = math.log(100.0)


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention) if compiled else flex_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None,
              scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; on CPU, bf16/fp16 inputs are computed in fp32 and cast back: PyTorch's
    CPU bf16 attention backward is ~3.5x slower than fp32 (a shapes STAR training step under bf16 autocast on an
    AMX CPU: 0.32 s, with fp32 attention 0.27 s, all fp32 0.38 s).

    A ``BlockMask`` selects FlexAttention, which skips the blocks of the score matrix the mask hides entirely:
    compiled on CUDA; on the CPU only its eager reference (inference only: PyTorch has no CPU backward for it),
    which exists here to check the mask against the dense one. SDPA is an autocast op and casts mixed inputs
    itself; FlexAttention is not, so keys and values are cast to the queries' dtype here."""
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a BlockMask
        flex = _flex_attention(compiled=q.device.type == "cuda")
        return flex(q, k.to(q.dtype), v.to(q.dtype), block_mask=attn_mask, scale=scale)
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, scale=scale)
    return out.to(q.dtype)


class _QKNorm(nn.Module):
    """Shared by both attentions: head split, optional cosine attention with a learnable per-head scale."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qk_norm = qk_norm
        if qk_norm:  # q <- normalize(q) * exp(min(s_h, ln 100)), k <- normalize(k), softmax scale 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        # Without QK-norm: VAR's scale 0.25/sqrt(head_dim).
        self.softmax_scale = 1.0 if qk_norm else 0.25 / math.sqrt(self.head_dim)

    def normalize_q(self, q: torch.Tensor) -> torch.Tensor:
        if not self.qk_norm:
            return q
        scale = self.scale_mul_1H11.clamp_max(_MAX_SCALE_LOG).exp()
        return F.normalize(q.float(), dim=-1).mul(scale).to(q.dtype)

    def normalize_k(self, k: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the input dtype: in fp16 F.normalize's eps (1e-12) underflows to 0, so a zero key (text
        # padding) became 0/0 = NaN and every cross-attention output with it (fp16 autocast on the CPU, where the
        # norm is not autocast to fp32 as on CUDA). Returned in the input dtype, as attention takes it.
        return F.normalize(k.float(), dim=-1).to(k.dtype) if self.qk_norm else k

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:  # (B,H,L,hd) -> (B,L,C)
        return out.transpose(1, 2).flatten(2)


class KVCache:
    """Preallocated keys/values of one self-attention layer for a whole generation: (B, H, L, hd)."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, num_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, n: int) -> None:
        """Drop batch rows >= n (e.g. the unconditional half once guidance has ended)."""
        self.k, self.v = self.k[:n], self.v[:n]


class SelfAttention(_QKNorm):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__(dim, num_heads, qk_norm)
        self.mat_qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, L, C); rope = (cos, sin) of these L positions; attn_mask bool (L, Lk), True = attend (or a
        FlexAttention ``BlockMask``)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = self.normalize_q(q), self.normalize_k(k)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, attn_mask, self.softmax_scale)
        return self.proj(self.merge_heads(out))


class CrossAttention(_QKNorm):
    """Image tokens attend to text tokens; keys/values come straight from the text encoder's hidden states."""

    def __init__(self, dim: int, text_dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__(dim, num_heads, qk_norm)
        self.mat_kv = Linear(text_dim, 2 * dim, bias=False)
        self.mat_q = Linear(dim, dim, bias=False)
        self.proj = Linear(dim, dim)

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised keys, values), each (B, H, Lt, hd): computed once per generation."""
        B, Lt, _ = text.shape
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        kv = linear(text, self.mat_kv.weight, bias).view(B, Lt, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.normalize_k(k), v

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor],
                text_bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, C); text_bias additive (B, 1, 1, Lt): 0 for valid tokens, -inf for padding."""
        B, L, C = x.shape
        q = linear(x, self.mat_q.weight, self.q_bias).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out = attention(self.normalize_q(q), *text_kv, text_bias, self.softmax_scale)
        return self.proj(self.merge_heads(out))
