"""The modules the Wan2.2-S2V family adds to the shared DiT (``family="s2v"``), with the original parameter names,
so a Wan2.2-S2V checkpoint (and Live Avatar's LoRA over it) loads strictly without a key map.

- :class:`S2VAudioEncoder` (``casual_audio_encoder``): a learned mix of all wav2vec2 layers, then causal 1-D
  convolutions that downsample the video-rate features 4x in time to one group of audio tokens per latent frame
  (``audio_tokens`` local tokens plus a learned padding token) and, with the adaptive norm, one global embedding.
- :class:`AudioInjector` (``audio_injector``): after each listed block, the clip tokens of latent frame ``f`` (first
  normalised, adaptively from frame ``f``'s global audio embedding) attend to frame ``f``'s audio tokens; the result
  is added to the block's output.
- :class:`FramePacker` (``frame_packer``): clean motion latents before the clip packed into few tokens: the last
  frame at full resolution, the two before it 2x coarser, the sixteen before those 4x coarser, each at negative RoPE
  time positions.
- ``trainable_cond_mask`` (an embedding of the token type: 0 clip, 1 reference, 2 motion) and ``cond_encoder``
  (a patch embedding of a pose latent added to the clip tokens) live on the DiT itself.

Audio tokens of this family travel through the engines as one tensor ``[B, F, audio_tokens + 2, dim]``: the local
tokens, the padding token, then the global embedding (:func:`split_audio_tokens`), so that code that batches,
slices or caches audio tokens treats every family alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast_disabled
from .attention import CrossAttention
from .rope import axis_dims, inverse_frequencies

TOKEN_TYPES = {"clip": 0, "reference": 1, "motion": 2}
# Latent frames of each FramePack bucket, nearest first, and the spatial (and temporal) compression of each.
FRAMEPACK_BUCKETS = (1, 2, 16)
FRAMEPACK_FACTORS = (1, 2, 4)


def _silu_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without parameters (eps 1e-6) over the last dimension, then SiLU."""
    return F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))


class CausalConv1d(nn.Module):
    """``Conv1d`` over ``[B, C, T]`` with ``kernel - 1`` frames of replicate padding on the left only."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.left = kernel - 1
        self.conv = nn.Conv1d(channels_in, channels_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left, 0), mode="replicate"))


class AudioConvEncoder(nn.Module):
    """Video-rate features ``[B, T, feat]`` -> per-latent-frame tokens (``encoder.*``), 4x fewer frames.

    Local path: one convolution makes ``tokens`` channel groups, each group is then downsampled on its own by two
    strided convolutions. Global path (adaptive norm): the same downsampling of one group, then a linear map.
    """

    def __init__(self, feature_dim: int, dim: int, tokens: int, with_global: bool):
        super().__init__()
        self.tokens = tokens
        self.conv1_local = CausalConv1d(feature_dim, dim // 4 * tokens, 3)
        if with_global:
            self.conv1_global = CausalConv1d(feature_dim, dim // 4, 3)
            self.final_linear = nn.Linear(dim, dim)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, dim / 4, T]`` after the first convolution -> ``[N, T', dim]``."""
        x = _silu_norm(x.transpose(1, 2)).transpose(1, 2)
        x = _silu_norm(self.conv2(x).transpose(1, 2)).transpose(1, 2)
        return _silu_norm(self.conv3(x).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T, feat]`` -> local ``[B, T', tokens + 1, dim]`` and global ``[B, T', 1, dim]`` (or None),
        ``T' = ceil(T / 4)``."""
        b = x.shape[0]
        channels_first = x.transpose(1, 2)
        local = self.conv1_local(channels_first)  # [B, tokens * dim / 4, T]
        local = local.unflatten(1, (self.tokens, -1)).flatten(0, 1)  # [B * tokens, dim / 4, T]
        local = self._downsample(local).unflatten(0, (b, self.tokens)).transpose(1, 2)  # [B, T', tokens, dim]
        local = torch.cat([local, self.padding_tokens.expand(b, local.shape[1], 1, -1).to(local.dtype)], dim=2)
        if not hasattr(self, "conv1_global"):
            return local, None
        glob = self.final_linear(self._downsample(self.conv1_global(channels_first)))
        return local, glob[:, :, None]


class S2VAudioEncoder(nn.Module):
    """All wav2vec2 hidden states ``[B, T, layers, feat]`` (video rate) -> audio tokens ``[B, T / 4, A, dim]``
    (``casual_audio_encoder.*``; the misspelling is the original's key name)."""

    def __init__(self, feature_dim: int, layers: int, dim: int, tokens: int, with_global: bool):
        super().__init__()
        self.encoder = AudioConvEncoder(feature_dim, dim, tokens, with_global)
        self.weights = nn.Parameter(torch.full((1, layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, layers, feat]`` -> ``[B, ceil(T / 4), tokens + 2, dim]`` float32 (local tokens, padding token,
        global embedding; a model without the adaptive norm repeats the padding token in the global slot, unused)."""
        layers, width = self.weights.shape[1], self.encoder.conv1_local.conv.in_channels
        if features.dim() != 4 or tuple(features.shape[2:]) != (layers, width):
            raise ValueError(f"audio features of shape {tuple(features.shape)} do not fit the model "
                             f"(expected [B, video_frames, {layers}, {width}])")
        with autocast_disabled(features.device):
            w = F.silu(self.weights.float())[0, :, 0, 0]  # [layers]
            mixed = (features.float() * (w / w.sum())[:, None]).sum(2)  # [B, T, feat]
            local, glob = self.encoder(mixed.to(self.encoder.conv1_local.conv.weight.dtype))
        if glob is None:
            glob = local[:, :, -1:]
        return torch.cat([local, glob], dim=2).float()


def split_audio_tokens(audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, F, A + 1, dim]`` -> local tokens ``[B, F, A, dim]`` and the global embedding ``[B, F, dim]``."""
    return audio[:, :, :-1], audio[:, :, -1]


class AudioInjector(nn.Module):
    """Audio cross-attention after the blocks ``layers`` (``audio_injector.injector.N``, and with the adaptive norm
    ``audio_injector.injector_adain_layers.N``: diffusers' ``AdaLayerNorm`` driven by the global audio embedding)."""

    def __init__(self, dim: int, num_heads: int, layers: list[int], adaptive_norm: bool, eps: float = 1e-6):
        super().__init__()
        from diffusers.models.attention import AdaLayerNorm

        self.slot = {layer: i for i, layer in enumerate(sorted(layers))}
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, qk_norm=True, eps=eps) for _ in layers])
        if adaptive_norm:
            self.injector_adain_layers = nn.ModuleList(
                [AdaLayerNorm(output_dim=2 * dim, embedding_dim=dim, chunk_dim=1) for _ in layers])

    def forward(self, layer: int, x: torch.Tensor, audio: torch.Tensor, offset: int) -> torch.Tensor:
        """Add the audio of block ``layer`` to ``x`` ``[B, offset + F * T, dim]`` (the first ``offset`` tokens, sink
        and motion, get none); ``audio`` ``[B, F, A + 1, dim]`` (:func:`split_audio_tokens`)."""
        i = self.slot[layer]
        b, frames = audio.shape[:2]
        video = x[:, offset:]
        per_frame = video.reshape(b * frames, -1, video.shape[-1])
        local, glob = split_audio_tokens(audio.to(video.dtype))
        if hasattr(self, "injector_adain_layers"):
            normed = self.injector_adain_layers[i](per_frame, temb=glob.flatten(0, 1))
        else:
            normed = F.layer_norm(per_frame, per_frame.shape[-1:], eps=1e-6)
        out = self.injector[i](normed, local.flatten(0, 1)).reshape(video.shape)
        return torch.cat([x[:, :offset], video + out], dim=1)


def _sample(start: int, stop: int, count: int) -> np.ndarray:
    """``count`` integer positions spread from ``start`` to ``stop`` (both included), truncated toward zero: how the
    original code places the positions of compressed tokens on the full grid."""
    return np.linspace(start, stop, count).astype(int)


class FramePacker(nn.Module):
    """Clean motion latents ``[B, C, K, H, W]`` (the K latent frames before the clip) -> motion tokens and their
    RoPE angles (``frame_packer.*``). The last 19 frames are used (zero-padded at the front when fewer): the
    nearest through ``proj`` (the DiT's patch size), the next 2 through ``proj_2x`` (2x coarser in time and
    space), the 16 before through ``proj_4x`` (4x coarser)."""

    def __init__(self, in_dim: int, dim: int, patch_size: tuple[int, int, int], drop_mode: str = "padd"):
        super().__init__()
        _, ph, pw = patch_size
        self.patch = (ph, pw)
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, ph, pw), stride=(1, ph, pw))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 2 * ph, 2 * pw), stride=(2, 2 * ph, 2 * pw))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 4 * ph, 4 * pw), stride=(4, 4 * ph, 4 * pw))
        self.drop_mode = drop_mode

    def forward(self, motion: torch.Tensor, keep_levels: int = 2) -> torch.Tensor:
        """``[B, C, K, H, W]`` -> tokens ``[B, M, dim]`` (nearest level first). ``keep_levels < 2`` blanks the
        nearest ``2 - keep_levels`` levels (the original's ``add_last_motion``; with ``drop_mode="drop"`` they are
        removed instead)."""
        total = sum(FRAMEPACK_BUCKETS)
        b, c, k, hh, ww = motion.shape
        packed = motion.new_zeros(b, c, total, hh, ww)
        overlap = min(total, k)
        if overlap:
            packed[:, :, total - overlap:] = motion[:, :, k - overlap:]
        if keep_levels < 2 and self.drop_mode != "drop":
            blank = sum(FRAMEPACK_BUCKETS[: len(FRAMEPACK_BUCKETS) - keep_levels - 1])
            packed[:, :, total - blank:] = 0
        far, mid, near = packed.split(list(FRAMEPACK_BUCKETS)[::-1], dim=2)
        levels = [self.proj(near), self.proj_2x(mid), self.proj_4x(far)]
        levels = [lv.flatten(2).transpose(1, 2) for lv in levels]
        if self.drop_mode == "drop":
            levels = levels[2 - keep_levels:] if keep_levels < 2 else levels
        return torch.cat(levels, dim=1)

    def angles(self, latent_hw: tuple[int, int], head_dim: int, theta: float, keep_levels: int = 2,
               device=None) -> torch.Tensor:
        """RoPE angles ``[M, head_dim / 2]`` (float64) of :meth:`forward`'s tokens: level ``l`` sits at time positions
        ``-(frames before and in it)`` onwards, its coarse tokens at positions spread over the full token grid."""
        h, w = latent_hw[0] // self.patch[0], latent_hw[1] // self.patch[1]
        dt, dh, dw = axis_dims(head_dim)
        inv = [inverse_frequencies(d, theta) for d in (dt, dh, dw)]
        out, seen = [], 0
        for level, (frames, factor) in enumerate(zip(FRAMEPACK_BUCKETS, FRAMEPACK_FACTORS)):
            seen += frames
            if self.drop_mode == "drop" and level < 2 - keep_levels:
                continue
            times = -_sample(seen, seen - frames + 1, frames // factor)
            rows, cols = _sample(0, h - 1, h // factor), _sample(0, w - 1, w // factor)
            t, r, col = np.meshgrid(times, rows, cols, indexing="ij")
            pos = [torch.from_numpy(a.reshape(-1)).to(torch.float64) for a in (t, r, col)]
            out.append(torch.cat([p[:, None] * f[None] for p, f in zip(pos, inv)], dim=1))
        return torch.cat(out).to(device)
