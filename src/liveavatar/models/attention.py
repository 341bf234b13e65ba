"""Attention layers of the audio DiT, with the parameter names of the original Wan2.1 release.

Shapes: ``B`` batch, ``L`` query tokens, ``S`` key tokens, ``H`` heads, ``D`` head dimension, ``dim = H * D``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import RotaryTable


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, computed in float32 (Wan's ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (Wan's ``WanLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on ``[B, L, H, D]`` / ``[B, S, H, D]`` tensors.

    ``mask`` is a boolean ``[L, S]`` or ``[B, 1, L, S]`` tensor, True where a query may see a key.
    Returns ``[B, L, H * D]``.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Self-attention with RMS-normed q/k over the whole model width and 3-axis RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-rotated ``q, k, v`` ``[B, L, H, D]`` of ``x`` ``[B, L, dim]``.

        Keys are returned before RoPE so that a cache may store them un-rotated (Rolling RoPE, RAPR).
        """
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(x)).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: RotaryTable, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence self-attention: ``x`` ``[B, L, dim]``, ``rope`` for the ``L`` tokens."""
        q, k, v = self.project(x)
        return self.o(attend(rope.rotate(q), rope.rotate(k), v, mask))


class CrossAttention(nn.Module):
    """Cross-attention from video tokens to a context (text), q/k RMS-normed, no RoPE."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, S, H, D]`` of ``context`` ``[B, S, context_dim]`` (cacheable: they do not change
        while the context does not)."""
        heads = (self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` ``[B, L, dim]`` attends to ``context`` ``[B, S, context_dim]``, or to its keys and values ``kv``
        precomputed by :meth:`context_kv` (``[1 or B, S, H, D]``; a stream computes them once)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = kv if kv is not None else self.context_kv(context)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        return self.o(attend(q, k, v))


class AudioCrossAttention(nn.Module):
    """Per-latent-frame audio cross-attention: the tokens of latent frame ``f`` attend only to the audio
    tokens of frame ``f``. A pre-norm residual branch whose output projection starts at zero, so adding it to
    a pretrained Wan model changes nothing until it is trained.
    """

    def __init__(self, dim: int, num_heads: int, audio_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn = CrossAttention(dim, num_heads, context_dim=audio_dim, eps=eps)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, frames: int) -> torch.Tensor:
        """``x`` ``[B, frames * T, dim]`` video tokens, ``audio`` ``[B, frames, A, audio_dim]`` -> ``[B, frames * T, dim]``."""
        b = x.shape[0]
        per_frame = self.norm(x).reshape(b * frames, -1, x.shape[-1])
        out = self.attn(per_frame, audio.flatten(0, 1))
        return out.reshape(b, -1, x.shape[-1])
