"""``AvatarDiT``: the Wan2.1 diffusion transformer with audio cross-attention, reference conditioning and a
block-causal mode.

Token layout: a latent video ``[B, C, F, H, W]`` becomes ``F * h * w`` tokens (``h = H / patch_h``,
``w = W / patch_w``), frame-major. With ``reference="sink"`` the reference latent's tokens are prepended; they
carry timestep 0, see only themselves, and are dropped from the output. Every frame has its own timestep, so
``t`` may be ``[B]`` (one level for the clip) or ``[B, F]`` (Diffusion Forcing, streaming). Stage 1's motion
frames (noisy frames just before the clip, each with its own timestep) follow the sink; they are context only,
so they too are dropped from the output (see :mod:`liveavatar.models.layout` for who sees them).

The forward is split into stages (:meth:`embed_video`, :meth:`time_modulation`, :meth:`embed_text`,
:meth:`embed_audio`, blocks, :meth:`unpatchify`) so that the streaming engine reuses them with its own
self-attention (a KV cache) through the ``attention`` callable each block receives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from ..devices import autocast_disabled
from .attention import AudioCrossAttention, CrossAttention, FP32LayerNorm, RMSNorm, SelfAttention, attend
from .audio import AudioProjection, split_into_blocks, split_video_frames
from .config import DiTConfig
from .layout import SequenceAttention, sequence_attention
from .rope import RotaryTable, grid_angles
from .s2v import TOKEN_TYPES, AudioInjector, FramePacker, S2VAudioEncoder


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: ``cat(cos, sin)`` of ``t * 10000 ** (-i / (dim / 2))`` computed in float64.

    ``t`` any shape -> ``[*t.shape, dim]`` float32.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


def first_frame_condition(x: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan2.2-TI2V's text-image-to-video conditioning: the clip's first latent frame becomes the image latent, clean
    (timestep 0), the rest stays as it is. ``x`` ``[B, C, F, H, W]``, ``t`` ``[B, F]``, ``image`` ``[B, C, 1+, H, W]``
    (its first frame is used); returns the new ``x`` and ``t``."""
    x = torch.cat([image[:, :, :1].to(x.dtype), x[:, :, 1:]], dim=2)
    t = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:]], dim=1)
    return x, t


def token_segments(sizes: list[int], device) -> torch.Tensor:
    """``[sum(sizes)]``: the modulation row of every token when row ``i`` covers ``sizes[i]`` consecutive tokens. Built
    on the host from the (host) sizes and copied over: expanding by sizes on the device would wait for it."""
    return torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes)).to(device)


class SelfAttentionFn(Protocol):
    """How a block's self-attention is computed: given the block index and un-rotated ``q, k, v``
    ``[B, L, H, D]``, return ``[B, L, H * D]`` (before the output projection)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TextKV:
    """The text cross-attention keys and values of every block, ``[1, S, H, D]`` each: a stream's text does not
    change, so they are computed once (:meth:`AvatarDiT.text_kv`) instead of in every forward."""

    per_block: list[tuple[torch.Tensor, torch.Tensor]]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int,
             segments: torch.Tensor | None = None) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with one ``shift``/``scale`` ``[B, frames, dim]`` per frame of ``x`` ``[B, L, dim]``
    (equal frames), or per segment: ``segments`` ``[L]`` gives each token its row of ``shift``/``scale``."""
    b, n, d = x.shape
    if segments is not None:
        return (x.float() * (1 + scale[:, segments]) + shift[:, segments]).type_as(x)
    xf = x.float().reshape(b, frames, n // frames, d)
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(b, n, d).type_as(x)


def gate(x: torch.Tensor, g: torch.Tensor, frames: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """``x * g`` with one gate ``[B, frames, dim]`` per frame of ``x`` ``[B, L, dim]`` (float32), or per segment."""
    b, n, d = x.shape
    if segments is not None:
        return x.float() * g[:, segments]
    return (x.float().reshape(b, frames, n // frames, d) * g[:, :, None]).reshape(b, n, d)


class DiTBlock(nn.Module):
    """Wan2.1 attention block (``blocks.N``) plus an optional per-latent-frame audio cross-attention."""

    def __init__(self, cfg: DiTConfig, index: int):
        super().__init__()
        self.index = index
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.audio_attn = (
            AudioCrossAttention(cfg.dim, cfg.num_heads, cfg.audio_dim, cfg.eps)
            if cfg.has_audio and cfg.family == "wan" and index in cfg.audio_blocks
            else None
        )
        if self.audio_attn is not None and cfg.listening:  # StreamAvatar's interact audio attention (listening cues)
            self.interact_audio_attn = AudioCrossAttention(cfg.dim, cfg.num_heads, cfg.audio_dim, cfg.eps)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        attention: SelfAttentionFn,
        audio: torch.Tensor | None = None,
        audio_offset: int = 0,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[B, L, dim]`` tokens of ``F`` frames (``L = F * T``).
            e: ``[B, F, 6, dim]`` per-frame time modulation (float32); with ``segments`` ``[L]`` (frames of unequal
                size: FramePack motion) token ``i`` takes row ``segments[i]``.
            context: ``[B, S, dim]`` embedded text, or its precomputed keys and values (:class:`TextKV`).
            attention: computes self-attention from un-rotated ``q, k, v`` (full sequence or KV cache).
            audio: ``[B, F_audio, A, audio_dim]`` audio tokens of the last ``F_audio`` frames of ``x``
                (the first ``audio_offset`` tokens, the reference sink, get none).
        """
        frames = e.shape[1]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float()[:, None] + e).unbind(2)
        q, k, v = self.self_attn.project(modulate(self.norm1(x), shift_sa, scale_sa, frames, segments))
        y = self.self_attn.o(attention(self.index, q, k, v))
        x = x + gate(y, gate_sa, frames, segments).type_as(x)
        if isinstance(context, TextKV):
            x = x + self.cross_attn(self.norm3(x), kv=context.per_block[self.index])
        else:
            x = x + self.cross_attn(self.norm3(x), context)
        if self.audio_attn is not None and audio is not None:
            video = x[:, audio_offset:]
            if hasattr(self, "interact_audio_attn"):  # tokens [talking | listening] (AvatarDiT.embed_audio)
                talk, listen = audio.chunk(2, dim=2)
                update = (self.audio_attn(video, talk, audio.shape[1])
                          + self.interact_audio_attn(video, listen, audio.shape[1]))
            else:
                update = self.audio_attn(video, audio, audio.shape[1])
            x = torch.cat([x[:, :audio_offset], video + update], dim=1)
        y = self.ffn(modulate(self.norm2(x), shift_ff, scale_ff, frames, segments))
        return x + gate(y, gate_ff, frames, segments).type_as(x)

    def context_kv(self, context: torch.Tensor):
        """Cross-attention keys and values of embedded text ``[B, S, dim]``, computed once per stream (a method of
        the block, not of its ``cross_attn``, so that a sharded block gathers its weights for it)."""
        return self.cross_attn.context_kv(context)


class Head(nn.Module):
    """Output head (``head.head``, ``head.modulation``): modulated norm, then a linear map to patch pixels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, dim]``, ``e`` ``[B, F, dim]`` time embedding -> ``[B, L, out_dim * prod(patch)]``."""
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale, e.shape[1]))


class AvatarDiT(nn.Module):
    """Causal audio-driven video DiT with the parameter names of Wan2.1's ``WanModel``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.reference == "concat":
            # Adding a second patch embedding of the reference equals concatenating it on channels; it starts
            # at zero so that a plain Wan checkpoint behaves exactly as before.
            self.ref_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        wan_audio = cfg.has_audio and cfg.family == "wan"
        self.audio_proj = AudioProjection(cfg) if wan_audio else None
        if wan_audio and cfg.listening:
            self.interact_audio_proj = AudioProjection(cfg)
        self.audio_modulation = nn.Linear(cfg.audio_dim, cfg.dim) if wan_audio and cfg.audio_modulation else None
        if cfg.family == "s2v":
            self._build_s2v(cfg)
        self.gradient_checkpointing = False
        self._init_weights()

    def _build_s2v(self, cfg: DiTConfig) -> None:
        """Wan2.2-S2V's modules, under the original names (see :mod:`liveavatar.models.s2v`)."""
        if cfg.cond_dim:
            self.cond_encoder = nn.Conv3d(cfg.cond_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = S2VAudioEncoder(cfg.audio_feature_dim, cfg.audio_layers_in, cfg.dim,
                                                    cfg.audio_tokens, cfg.audio_adaptive_norm)
        self.audio_injector = AudioInjector(cfg.dim, cfg.num_heads, cfg.audio_blocks, cfg.audio_adaptive_norm, cfg.eps)
        self.trainable_cond_mask = nn.Embedding(len(TOKEN_TYPES), cfg.dim)
        if cfg.framepack:
            self.frame_packer = FramePacker(cfg.in_dim, cfg.dim, cfg.patch_size, cfg.framepack_drop_mode)

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        """Wan's initialisation: Xavier for linear layers and the patch embedding, normal(0.02) for the
        embeddings, and a zero head (a fresh model predicts zeros); then the additions (:meth:`init_addition`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for layer in seq:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.config.family == "s2v":  # as the original's zero_init: the conditioning paths start silent
            zeros = [self.trainable_cond_mask.weight, getattr(self, "cond_encoder", None)]
            zeros += [attn.o for attn in self.audio_injector.injector]
            zeros += [norm.linear for norm in getattr(self.audio_injector, "injector_adain_layers", [])]
            for item in zeros:
                for p in ([item] if isinstance(item, nn.Parameter) else item.parameters() if item is not None else []):
                    nn.init.zeros_(p)
        for name, module in self.named_modules():
            if name in ("audio_proj", "interact_audio_proj", "ref_embedding", "audio_modulation") or \
                    name.endswith((".audio_attn", ".interact_audio_attn")):
                self.init_addition(name, module)

    @staticmethod
    def is_audio_parameter(name: str) -> bool:
        """Whether parameter ``name`` (as ``named_parameters`` gives it, LoRA or wrapper prefixes allowed) belongs to
        the audio route: the feature projections, the per-frame audio modulation and the blocks' audio attention."""
        parts = name.split(".")
        return any(p in ("audio_proj", "interact_audio_proj", "audio_modulation", "audio_attn", "interact_audio_attn")
                   for p in parts)

    @staticmethod
    @torch.no_grad()
    def init_addition(name: str, module: nn.Module) -> None:
        """Initialise one module this project adds to Wan2.1 so that its contribution starts at zero: the
        reference embedding and the audio attention's output projection are zero, the rest is Xavier/identity."""
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(sub.weight.flatten(1) if sub.weight.dim() > 2 else sub.weight)
                nn.init.zeros_(sub.bias)
            elif isinstance(sub, (nn.LayerNorm, RMSNorm)):
                sub.reset_parameters() if isinstance(sub, nn.LayerNorm) else nn.init.ones_(sub.weight)
        if isinstance(module, AudioProjection):
            nn.init.zeros_(module.layer_weights)
        if isinstance(module, AudioCrossAttention):
            nn.init.zeros_(module.attn.o.weight)
            nn.init.zeros_(module.attn.o.bias)
        if name in ("ref_embedding", "audio_modulation"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: DiTConfig | None = None, **kwargs) -> "AvatarDiT":
        """Load a Wan2.1-layout or diffusers-layout checkpoint (see :mod:`liveavatar.models.checkpoint`)."""
        from .checkpoint import load_dit

        return load_dit(path, config=config, **kwargs)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write the original Wan2.1 layout: ``config.json`` + ``diffusion_pytorch_model*.safetensors``."""
        from .checkpoint import save_dit

        save_dit(self, path, max_shard_bytes=max_shard_bytes)

    # --------------------------------------------------------------------------------------------- stages
    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token rows and columns of a latent frame of size ``(H, W)``; raises if the patch does not divide it."""
        _, ph, pw = self.config.patch_size
        h, w = latent_hw
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        return h // ph, w // pw

    def embed_video(self, x: torch.Tensor, reference: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, C, F, H, W]`` -> tokens ``[B, F * h * w, dim]``; with ``reference="concat"`` the reference
        ``[B, C, 1, H, W]`` is added to every frame. s2v: the pose condition latent ``cond`` ``[B, cond_dim, F, H, W]``
        is embedded and added (None: an all-zero condition, which leaves the embedding's bias), and so is the clip's
        token-type embedding."""
        self.token_grid(x.shape[-2:])
        if self.config.patch_size[0] != 1:
            raise NotImplementedError("temporal patching (patch_size[0] > 1) is not supported by the streaming DiT")
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        if self.config.reference == "concat" and reference is not None:
            tokens = tokens + self.ref_embedding(reference[:, :, :1].to(tokens.dtype))
        if hasattr(self, "cond_encoder"):
            if cond is None:  # one patch of zeros: the embedding's bias (called as a module, so a sharded one gathers)
                _, ph, pw = self.config.patch_size
                zero = tokens.new_zeros(1, self.config.cond_dim, 1, ph, pw, dtype=self.cond_encoder.weight.dtype)
                tokens = tokens + self.cond_encoder(zero).to(tokens.dtype)
            else:
                tokens = tokens + self.cond_encoder(cond.to(tokens.dtype))
        tokens = tokens.flatten(2).transpose(1, 2)
        return self._typed(tokens, "clip")

    def embed_reference(self, reference: torch.Tensor) -> torch.Tensor:
        """Sink tokens ``[B, R * h * w, dim]`` of the reference latent ``[B, C, R, H, W]``."""
        tokens = self.patch_embedding(reference.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return self._typed(tokens, "reference")

    def embed_motion(self, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s2v FramePack: clean motion latents ``[B, C, K, H, W]`` (before the clip) -> tokens ``[B, M, dim]`` and their
        RoPE angles ``[M, head_dim / 2]``."""
        if not hasattr(self, "frame_packer"):
            raise ValueError("this model has no FramePack motion encoder (model.framepack is off)")
        tokens = self.frame_packer(motion.to(self.patch_embedding.weight.dtype))
        angles = self.frame_packer.angles(motion.shape[-2:], self.config.head_dim, self.config.rope_theta,
                                          device=motion.device)
        return self._typed(tokens, "motion"), angles

    def _typed(self, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        """s2v: add the token-type embedding (clip, reference or motion) to ``[B, L, dim]`` tokens."""
        if not hasattr(self, "trainable_cond_mask"):
            return tokens
        kind = torch.full((1, 1), TOKEN_TYPES[kind], dtype=torch.long, device=tokens.device)
        return tokens + self.trainable_cond_mask(kind).to(tokens.dtype)

    def time_modulation(self, t: torch.Tensor, audio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` ``[B, F]`` -> time embedding ``[B, F, dim]`` (for the head) and block modulation ``[B, F, 6, dim]``,
        both float32. With ``audio_modulation``, audio tokens ``[B, F_audio, A, audio_dim]`` of the last ``F_audio``
        frames are added to their frames' embeddings (earlier frames, the sink, get none)."""
        with autocast_disabled(t.device):
            e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim).to(self.time_embedding[0].weight.dtype)).float()
            if audio is not None and self.audio_modulation is not None:
                talk = audio.chunk(2, dim=2)[0] if self.config.listening else audio  # the avatar's own voice
                shift = self.audio_modulation(talk.mean(2).to(self.audio_modulation.weight.dtype)).float()
                e = torch.cat([e[:, : e.shape[1] - shift.shape[1]], e[:, e.shape[1] - shift.shape[1]:] + shift], dim=1)
            e6 = self.time_projection(e.to(self.time_embedding[0].weight.dtype)).float().unflatten(-1, (6, self.config.dim))
        return e, e6

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, S, text_dim]`` with ``S <= text_len`` -> ``[B, text_len, dim]``; zero-padded to ``text_len`` first,
        as Wan2.1 does (the padded positions are attended to)."""
        b, s, d = context.shape
        if d != self.config.text_dim:
            raise ValueError(f"text context has width {d}, the model expects text_dim={self.config.text_dim}")
        if s > self.config.text_len:
            raise ValueError(f"text context has {s} tokens, more than the model's text_len={self.config.text_len}")
        if s < self.config.text_len:
            context = torch.cat([context, context.new_zeros(b, self.config.text_len - s, d)], dim=1)
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    @torch.no_grad()
    def text_kv(self, context: torch.Tensor) -> TextKV:
        """Cross-attention keys/values of every block for embedded text ``[1, text_len, dim]``."""
        return TextKV([block.context_kv(context) for block in self.blocks])

    def embed_audio(self, features: torch.Tensor, latent_frames: int | None = None) -> torch.Tensor:
        """Audio encoder features -> tokens ``[B, F, A, audio_dim]``. ``features`` are per video frame from the
        clip's first frame ``[B, video_frames, layers, feat]``, or already grouped by latent frame
        ``[B, F, per_latent, layers, feat]`` (a slice of a longer video).

        s2v: ``[B, video_frames_per_latent * F, layers, feat]``, the clip's frames (its latent frames hold
        ``video_frames_per_latent`` video frames each: the original places motion frames before the clip); the
        encoder sees ``motion_video_frames`` copies of the first frame before them, as the original does.
        """
        if self.config.family == "s2v":
            if features.dim() == 5:  # grouped by latent frame (group_audio): the video frames in order
                features = features.flatten(1, 2)
            pad = features[:, :1].expand(-1, self.config.motion_video_frames, *features.shape[2:])
            tokens = self.casual_audio_encoder(torch.cat([pad, features], dim=1))
            tokens = tokens[:, self.config.motion_latent_frames:]
            return tokens if latent_frames is None else tokens[:, :latent_frames]
        if self.audio_proj is None:
            raise ValueError("this model has no audio modules (model.audio_dim = 0)")
        if self.config.listening:
            return self._talk_and_listen(features, lambda proj, f: proj.project_grouped(f) if f.dim() == 5
                                         else proj(f, latent_frames))
        if features.dim() == 5:
            return self.audio_proj.project_grouped(features)
        return self.audio_proj(features, latent_frames)

    def _talk_and_listen(self, features: torch.Tensor, project) -> torch.Tensor:
        """Listening models: features with the two streams on the layer axis -> tokens ``[B, F, 2 * A, audio_dim]``,
        the talking stream's (``audio_proj``) then the listening stream's (``interact_audio_proj``)."""
        layers = self.config.audio_layers_in
        if features.shape[-2] != 2 * layers:
            raise ValueError(f"a listening model takes two audio streams stacked on the layer axis "
                             f"({2 * layers} layers), got features of shape {tuple(features.shape)}")
        talk, listen = features[..., :layers, :], features[..., layers:, :]
        return torch.cat([project(self.audio_proj, talk), project(self.interact_audio_proj, listen)], dim=2)

    def audio_block_inputs(self, features: torch.Tensor, blocks: int | None = None) -> list[torch.Tensor]:
        """Per-video-frame audio features of a whole stream ``[B, V, layers, feat]`` -> one input per block of
        ``frames_per_block`` latent frames, for :meth:`embed_audio_block`: grouped by latent frame
        ``[B, F, per_latent, layers, feat]`` (wan), or the block's video frames ``[B, per_latent * F, layers, feat]``
        (s2v: each block's audio is encoded on its own, as Live Avatar's release does)."""
        cfg = self.config
        if cfg.family == "s2v":
            features = features.flatten(1, 2) if features.dim() == 5 else features
            return split_video_frames(features, cfg.frames_per_block, cfg.video_frames_per_latent, blocks)
        grouped = split_into_blocks(features, cfg.frames_per_block, cfg.video_frames_per_latent)
        return grouped if blocks is None else grouped[:blocks]

    def embed_audio_block(self, block_input: torch.Tensor) -> torch.Tensor:
        """One block's audio input (:meth:`audio_block_inputs`) -> tokens ``[B, F, A, audio_dim]``."""
        if self.config.family == "s2v":
            return self.embed_audio(block_input)
        if self.audio_proj is None:
            raise ValueError("this model has no audio modules (model.audio_dim = 0)")
        if self.config.listening:
            return self._talk_and_listen(block_input, lambda proj, f: proj.project_grouped(f))
        return self.audio_proj.project_grouped(block_input)

    def unpatchify(self, out: torch.Tensor, frames: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Head output ``[B, F * h * w, out_dim * pt * ph * pw]`` -> ``[B, out_dim, F, H, W]``."""
        pt, ph, pw = self.config.patch_size
        h, w = self.token_grid(latent_hw)
        b = out.shape[0]
        out = out.reshape(b, frames, h, w, pt, ph, pw, self.config.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, frames * pt, h * ph, w * pw)

    def run_blocks(self, x, e6, context, attention: SelfAttentionFn, audio=None, audio_offset: int = 0,
                   segments: torch.Tensor | None = None):
        """All blocks in order (s2v: each followed by its audio injection). With ``gradient_checkpointing`` set and
        gradients on, each block's activations are recomputed in the backward pass instead of kept (memory of one
        block instead of all)."""
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = recompute_in_backward(self._block, block, x, e6, context, attention, audio, audio_offset,
                                          segments, use_reentrant=False)
            else:
                x = self._block(block, x, e6, context, attention, audio, audio_offset, segments)
        return x

    def _block(self, block, x, e6, context, attention, audio, audio_offset, segments):
        x = block(x, e6, context, attention, audio, audio_offset, segments)
        injector = getattr(self, "audio_injector", None)
        if injector is not None and audio is not None and block.index in injector.slot:
            x = injector(block.index, x, audio, audio_offset)
        return x

    # ---------------------------------------------------------------------------------------- full forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        audio: torch.Tensor | None = None,
        causal: bool = False,
        reference: torch.Tensor | None = None,
        frame_pos: torch.Tensor | None = None,
        reference_pos: torch.Tensor | None = None,
        window_blocks: int | None = None,
        motion: torch.Tensor | None = None,
        motion_t: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        motion_latents: torch.Tensor | None = None,
        sink_visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-sequence forward (training, and the reference for the streaming engine).

        Args:
            x: ``[B, C, F, H, W]`` noisy latents.
            t: ``[B]`` or ``[B, F]`` timesteps in ``[0, 1000]``.
            context: ``[B, S, text_dim]`` text embeddings (``S <= text_len``).
            audio: ``[B, video_frames, layers, feat]`` audio encoder features of the clip
                (``video_frames = 1 + 4 (F - 1)`` for Wan's VAE), or grouped ``[B, F, per_latent, layers, feat]``.
            causal: block-causal attention over blocks of ``frames_per_block`` latent frames.
            reference: ``[B, C, R, H, W]`` reference latent (used as the config's ``reference`` mode says; with
                ``first_frame`` it is the clean first latent frame, and the output's first frame is meaningless).
            frame_pos: ``[F]`` or ``[B, F]`` RoPE time positions of the frames (default ``K..K+F-1``: the stream
                starts with the ``K`` motion frames, if any).
            reference_pos: RoPE time positions of the sink frames: ``[R]`` or ``[B, R]`` (default: the config's
                ``reference_position`` and the frames after it), or ``[B, F / frames_per_block, R]`` to give each
                block its own sink position (Rolling RoPE, RAPR; causal only).
            window_blocks: causal only: each block attends to at most this many earlier blocks.
            motion: ``[B, C, K, H, W]`` noisy latents of the ``K`` frames before the clip (Stage 1's motion frames),
                at positions ``frame_pos[..., 0] - K .. frame_pos[..., 0] - 1``. Every clip frame sees them (whatever
                the window); they see the sink and each other, not the clip, and get no audio.
            motion_t: ``[B]`` or ``[B, K]`` their timesteps (required with ``motion``).
            cond: s2v: ``[B, cond_dim, F, H, W]`` pose condition latent (None: all zero).
            motion_latents: s2v: ``[B, C, K, H, W]`` clean latents before the clip, FramePack-encoded
                (:meth:`embed_motion`). Bidirectional: every token sees every token, as in the original S2V forward.
                Block-causal: the motion tokens join the sink (``model.sink_motion``, as Live Avatar's release streams),
                at their own fixed time positions in the frames' numbering (``-1``, ``-3``, ...).
            sink_visible: ``[B, F / frames_per_block]`` bool, with a sink position per block: False hides that
                block's sink from it (the reference has left with the window, ``engine.sink=evicted``).
        Returns:
            ``[B, out_dim, F, H, W]`` predicted velocity (float32).
        """
        cfg = self.config
        b, _, frames, hh, ww = x.shape
        h, w = self.token_grid((hh, ww))
        if t.dim() == 1:
            t = t[:, None].expand(b, frames)
        if t.shape != (b, frames):
            raise ValueError(f"timesteps of shape {tuple(t.shape)} do not fit a batch of {b} clips of {frames} frames")
        if cfg.reference == "first_frame" and reference is not None:
            x, t = first_frame_condition(x, t, reference)
        k = 0 if motion is None else motion.shape[2]
        if frame_pos is None:
            frame_pos = torch.arange(k, k + frames, device=x.device)
        if motion is not None:
            if motion_t is None:
                raise ValueError("motion frames need their timesteps (motion_t)")
            motion_t = motion_t[:, None].expand(b, k) if motion_t.dim() == 1 else motion_t
            if motion.shape[:2] != x.shape[:2] or motion.shape[3:] != x.shape[3:] or motion_t.shape != (b, k):
                raise ValueError(f"motion frames {tuple(motion.shape)} with timesteps {tuple(motion_t.shape)} do not "
                                 f"fit clips {tuple(x.shape)}")
            # The motion frames continue the stream backwards from the clip's first frame.
            before = frame_pos[..., :1] - k + torch.arange(k, device=frame_pos.device)
            frame_pos = torch.cat([before, frame_pos], dim=-1)
            x, t = torch.cat([motion.to(x.dtype), x], dim=2), torch.cat([motion_t.to(t.dtype), t], dim=1)

        if cfg.family == "s2v" and not causal:
            return self._forward_s2v(x, t, context, audio, reference, frame_pos, reference_pos, cond, motion_latents)
        tokens = self.embed_video(x, reference, cond)
        sink_frames, sink_extra, segments, extra_tokens = 0, None, None, 0
        if cfg.reference == "sink" and reference is not None:
            sink_frames = reference.shape[2]
            if reference_pos is None:
                reference_pos = torch.arange(sink_frames, device=x.device) + cfg.reference_position
            sink = [self.embed_reference(reference)]
            if motion_latents is not None:  # the sink's motion tokens (model.sink_motion): one more t = 0 row
                motion_tokens, sink_extra = self.embed_motion(motion_latents)
                sink.append(motion_tokens)
                extra_tokens = motion_tokens.shape[1]
                segments = token_segments([h * w] * sink_frames + [extra_tokens] + [h * w] * (k + frames), x.device)
            tokens = torch.cat([*sink, tokens], dim=1)
            t = torch.cat([t.new_zeros(b, sink_frames + (extra_tokens > 0)), t], dim=1)
        else:
            if motion_latents is not None:
                raise ValueError("FramePack motion latents go into the reference sink (model.reference=sink with a "
                                 "reference) in the block-causal forward")
            reference_pos = None

        if audio is not None and audio.shape[0] != b:
            raise ValueError(f"audio features for {audio.shape[0]} clips do not fit a batch of {b}")
        audio_tokens = None
        if audio is not None and cfg.family == "s2v":  # each block's audio encoded on its own, as when streaming
            audio_tokens = torch.cat([self.embed_audio_block(a) for a in self.audio_block_inputs(
                audio, math.ceil(frames / cfg.frames_per_block))], dim=1)[:, :frames]
        elif audio is not None:
            audio_tokens = self.embed_audio(audio, frames)
        e, e6 = self.time_modulation(t, audio_tokens)
        attention = sequence_attention(frame_pos.to(x.device), None if reference_pos is None else reference_pos.to(x.device),
                                       (h, w), cfg.head_dim, cfg.rope_theta, causal, cfg.frames_per_block,
                                       window_blocks if causal else None, k, sink_extra,
                                       sink_visible if reference_pos is not None else None)
        # The sink's and the motion frames' tokens: no audio, no output.
        before_clip = (sink_frames + k) * h * w + extra_tokens
        out = self.run_blocks(tokens, e6, self.embed_text(context), attention, audio_tokens, before_clip, segments)
        out = self.head(out[:, before_clip:], e[:, -frames:])
        return self.unpatchify(out.float(), frames, (hh, ww))

    def _forward_s2v(self, x, t, context, audio, reference, frame_pos, reference_pos, cond, motion_latents):
        """The bidirectional s2v forward (the original ``WanModel_S2V.forward``): every token (reference, FramePack
        motion, clip) sees every token; reference and motion tokens carry timestep 0. ``t`` ``[B, F]``."""
        cfg = self.config
        b, _, frames, hh, ww = x.shape
        h, w = self.token_grid((hh, ww))
        if reference is None:
            raise ValueError("the s2v family needs a reference latent")
        r = reference.shape[2]
        if reference_pos is None:
            reference_pos = torch.arange(r, device=x.device) + cfg.reference_position
        if frame_pos is None:
            frame_pos = torch.arange(frames, device=x.device)
        if frame_pos.dim() != 1 or reference_pos.dim() != 1:
            raise ValueError("the bidirectional s2v forward takes one position list for the whole batch")
        tokens = [self.embed_reference(reference), self.embed_video(x, None, cond)]
        angles = [grid_angles(reference_pos.to(x.device), h, w, cfg.head_dim, cfg.rope_theta),
                  grid_angles(frame_pos.to(x.device), h, w, cfg.head_dim, cfg.rope_theta)]
        t_rows = torch.cat([t.new_zeros(b, r), t], dim=1)
        segments = None
        if motion_latents is not None:
            motion_tokens, motion_angles = self.embed_motion(motion_latents)
            tokens.insert(1, motion_tokens)
            angles.insert(1, motion_angles)
            # The motion tokens (t = 0) form one extra modulation row after the reference's frames.
            t_rows = torch.cat([t.new_zeros(b, r + 1), t], dim=1)
            segments = token_segments([h * w] * r + [motion_tokens.shape[1]] + [h * w] * frames, x.device)
        tokens = torch.cat(tokens, dim=1)
        rope = RotaryTable(torch.cat(angles))
        audio_tokens = self.embed_audio(audio, frames) if audio is not None else None
        e, e6 = self.time_modulation(t_rows)
        before_clip = tokens.shape[1] - frames * h * w
        out = self.run_blocks(tokens, e6, self.embed_text(context), SequenceAttention(rope, rope), audio_tokens,
                              before_clip, segments)
        out = self.head(out[:, before_clip:], e[:, -frames:])
        return self.unpatchify(out.float(), frames, (hh, ww))

    def num_parameters(self, base_only: bool = False) -> int:
        """Parameter count; ``base_only`` counts only the weights a Wan2.1 checkpoint has."""
        from .checkpoint import is_addition

        return sum(p.numel() for n, p in self.named_parameters() if not (base_only and is_addition(n)))
