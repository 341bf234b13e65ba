"""StreamAvatar's consistency-aware discriminator: a diffusion backbone read by Q-Formers, with a per-frame realism
branch and a per-video reference-consistency branch.

- **Backbone**: a DiT initialised from the teacher (frozen, or trained through a LoRA adapter). It runs its usual
  bidirectional forward on a noised clip at timestep ``t`` with the clip's conditioning; the outputs of a few of its
  blocks (``taps``) are read, the clip's tokens grouped by latent frame ``[B, F, h * w, dim]``.
- **Q-Formers** (one per tap, ``N_Q = len(taps)``, 3 in the paper): learnable *per-frame* queries that
  cross-attend to one frame's tokens of their tap, then a feed-forward; each gives one feature per frame
  ``[B, F, dim]``. A frame's feature is the ``N_Q`` features side by side ``[B, F, N_Q * dim]``.
- **Local realism branch**: a linear map of each frame's feature to one logit per frame ``[B, F]``.
- **Global consistency branch**: the reference image's feature (the same backbone and Q-Formers on the reference
  latent alone, as a clean one-frame clip) cross-attends to all frames' features, and a linear map gives one logit
  per video ``[B]``: a video that drifts from its reference can be told apart here even when every frame looks real.

Either branch can be switched off (``adversarial.local`` / ``adversarial.global_``) for the ablations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models import AvatarDiT


@contextlib.contextmanager
def block_taps(model: AvatarDiT, taps: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside, each forward of ``model`` stores the output ``[B, L, dim]`` of its blocks ``taps`` in the yielded dict
    (by block index; a later forward overwrites). Hooks are removed on exit, so a recomputation in the backward
    pass (gradient checkpointing) stores nothing."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [model.blocks[i].register_forward_hook(lambda _m, _in, out, i=i: outputs.__setitem__(i, out))
               for i in taps]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class QFormer(nn.Module):
    """Learnable queries that read one frame's tokens: ``[N, T, dim]`` -> ``[N, dim]`` (the queries' mean)."""

    def __init__(self, dim: int, heads: int, queries: int = 1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * dim**-0.5)
        self.norm_tokens = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm_tokens(tokens)
        q = self.queries.expand(tokens.shape[0], -1, -1)
        q = q + self.attention(self.norm_queries(q), tokens, tokens, need_weights=False)[0]
        q = q + self.ffn(self.norm_ffn(q))
        return q.mean(1)


@dataclass
class Logits:
    """Discriminator outputs: ``local [B, F]`` (None when the branch is off) and ``global_ [B]`` (None likewise)."""

    local: torch.Tensor | None
    global_: torch.Tensor | None

    def total(self) -> torch.Tensor:
        """Per clip ``[B]``: the mean local logit plus the global logit (what the gradient penalty differentiates)."""
        parts = [p for p in (None if self.local is None else self.local.mean(1), self.global_) if p is not None]
        return torch.stack(parts).sum(0)


class ConsistencyDiscriminator(nn.Module):
    """Backbone + Q-Formers + the two branches (see the module docstring).

    Args:
        backbone: the DiT (its trainable parameters are the caller's choice: frozen or LoRA).
        taps: block indices whose outputs the Q-Formers read (``N_Q`` of them).
        queries: learnable queries per frame and Q-Former.
        local, global_: which branches give logits.
    """

    def __init__(self, backbone: AvatarDiT, taps: list[int], queries: int = 1, local: bool = True,
                 global_: bool = True):
        super().__init__()
        cfg = backbone.config
        if not taps or any(not 0 <= i < cfg.num_layers for i in taps):
            raise ValueError(f"adversarial.taps must list blocks of the backbone (0..{cfg.num_layers - 1}), got {taps}")
        if not (local or global_):
            raise ValueError("the discriminator needs at least one branch (adversarial.local or adversarial.global_)")
        self.backbone, self.taps = backbone, sorted(set(int(i) for i in taps))
        width = cfg.dim * len(self.taps)
        self.qformers = nn.ModuleList([QFormer(cfg.dim, cfg.num_heads, queries) for _ in self.taps])
        self.local_head = nn.Linear(width, 1) if local else None
        if global_:
            self.global_norm = nn.LayerNorm(width)
            self.global_attention = nn.MultiheadAttention(width, cfg.num_heads, batch_first=True)
            self.global_head = nn.Linear(width, 1)

    @property
    def config(self):
        return self.backbone.config

    def frame_features(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, audio: torch.Tensor | None,
                       reference: torch.Tensor | None, motion_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame features ``[B, F, N_Q * dim]`` of the noised clip ``x`` ``[B, C, F, H, W]`` at ``t`` ``[B]``."""
        frames = x.shape[2]
        h, w = self.backbone.token_grid(x.shape[-2:])
        with block_taps(self.backbone, self.taps) as outputs:
            self.backbone(x, t, context, audio=audio, reference=reference, motion_latents=motion_latents)
        per_tap = []
        for tap, qformer in zip(self.taps, self.qformers):
            tokens = outputs[tap][:, -frames * h * w:]  # the clip's tokens come last (after sink and motion tokens)
            per_frame = tokens.reshape(x.shape[0] * frames, h * w, -1)
            per_tap.append(qformer(per_frame).reshape(x.shape[0], frames, -1))
        return torch.cat(per_tap, dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, audio: torch.Tensor | None = None,
                reference: torch.Tensor | None = None, motion_latents: torch.Tensor | None = None) -> Logits:
        """Logits of the noised clips ``x`` ``[B, C, F, H, W]`` at ``t`` ``[B]`` with their conditioning (as the
        backbone's forward takes it; ``reference`` ``[B, C, 1, H, W]`` is required by the global branch)."""
        features = self.frame_features(x, t, context, audio, reference, motion_latents)
        local = self.local_head(features).squeeze(-1) if self.local_head is not None else None
        global_ = None
        if hasattr(self, "global_head"):
            if reference is None:
                raise ValueError("the discriminator's global branch compares frames with the reference: none given")
            # The reference as a clean one-frame clip, with the text only (a still image has no audio).
            ref = self.frame_features(reference[:, :, :1], torch.zeros_like(t), context, None, reference)
            keys = self.global_norm(features)
            attended = self.global_attention(self.global_norm(ref), keys, keys, need_weights=False)[0]
            global_ = self.global_head(ref + attended).reshape(-1)
        return Logits(local, global_)


def relativistic_loss(first: Logits, second: Logits) -> torch.Tensor:
    """``softplus(-(first - second))`` averaged over the local logits' frames and clips, plus the same over the
    global logits' clips: small when ``first`` scores above ``second``. The discriminator minimises it with
    ``(real, fake)``, the generator with ``(fake, real)`` (a relativistic pairing, clip by clip)."""
    total = 0.0
    for a, b in ((first.local, second.local), (first.global_, second.global_)):
        if a is not None:
            total = total + F.softplus(-(a.float() - b.float())).mean()
    return total


def gradient_penalty(logits: Logits, inputs: torch.Tensor) -> torch.Tensor:
    """``mean over clips of || d total_logit / d inputs ||^2`` (R1 on real inputs, R2 on fake ones), with the graph
    kept so that the discriminator can be trained on it. ``inputs`` ``[B, ...]`` must require grad and have
    produced ``logits``."""
    (grad,) = torch.autograd.grad(logits.total().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def approximate_penalty(discriminate, inputs: torch.Tensor, logits: Logits, sigma: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The finite-difference stand-in for :func:`gradient_penalty` (for attention kernels without a double
    backward): ``mean over clips of (total(x + sigma n) - total(x))^2 / sigma^2``, ``n`` standard normal; its
    expectation over ``n`` is the squared gradient norm for small ``sigma``."""
    noise = torch.randn(inputs.shape, generator=generator, dtype=torch.float32).to(inputs)
    moved = discriminate(inputs + sigma * noise)
    return ((moved.total().float() - logits.total().float()) / sigma).pow(2).mean()
