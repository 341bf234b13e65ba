"""Audio conditioning: encoders that turn a waveform into per-video-frame features, and the projection that
turns those features into per-latent-frame audio tokens for the DiT.

Feature contract shared by every encoder: ``[B, V, layers, feat]`` for ``V`` video frames at the video frame
rate (the preset's ``model.fps``; :data:`VIDEO_FPS` by default), ``layers`` hidden states (wav2vec2: all of them;
the toy extractor: 1). Waveforms are mono at :data:`SAMPLE_RATE`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..media import SAMPLE_RATE, VIDEO_FPS  # noqa: F401 (re-exported: the rates the encoders assume by default)


def video_frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: float = VIDEO_FPS) -> int:
    """Video frames covered by ``num_samples`` of audio (rounded down; at least one for non-empty audio)."""
    return max(1, int(num_samples * fps // sample_rate)) if num_samples else 0


def resample_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear resampling along time: ``[B, T, ...]`` -> ``[B, frames, ...]`` (end points aligned)."""
    b, t = features.shape[:2]
    flat = features.reshape(b, t, -1).transpose(1, 2)
    if t == 1:
        out = flat.expand(-1, -1, frames)
    else:
        out = F.interpolate(flat.float(), size=frames, mode="linear", align_corners=True)
    return out.transpose(1, 2).reshape(b, frames, *features.shape[2:]).to(features.dtype)


def latent_frames_for(video_frames: int, per_latent: int = 4) -> int:
    """Latent frames of a causal video VAE for ``video_frames`` (the first alone, then ``per_latent`` each)."""
    return 1 + math.ceil((video_frames - 1) / per_latent) if video_frames else 0


def group_by_latent_frame(features: torch.Tensor, latent_frames: int, per_latent: int = 4) -> torch.Tensor:
    """Group per-video-frame features ``[B, V, ...]`` by latent frame -> ``[B, latent_frames, per_latent, ...]``.

    Latent frame 0 covers video frame 0 alone (repeated ``per_latent`` times); latent frame ``f >= 1`` covers video
    frames ``per_latent * (f - 1) + 1 .. per_latent * f``. Missing trailing video frames repeat the last one.
    """
    needed = 1 + per_latent * (latent_frames - 1)
    v = features.shape[1]
    if v == 0:
        raise ValueError("no audio features to group")
    if v < needed:
        features = torch.cat([features, features[:, -1:].expand(-1, needed - v, *features.shape[2:])], dim=1)
    first = features[:, :1].expand(-1, per_latent, *features.shape[2:])
    rest = features[:, 1:needed]
    grouped = torch.cat([first, rest], dim=1)
    return grouped.reshape(features.shape[0], latent_frames, per_latent, *features.shape[2:])


def group_by_video_frames(features: torch.Tensor, latent_frames: int, per_latent: int = 4) -> torch.Tensor:
    """Per-video-frame features ``[B, V, ...]`` -> ``[B, latent_frames, per_latent, ...]`` with latent frame ``j`` holding
    video frames ``per_latent * j .. per_latent * j + per_latent - 1`` (the s2v pairing, :func:`split_video_frames`);
    missing trailing frames repeat the last one."""
    v = features.shape[1]
    if v == 0:
        raise ValueError("no audio features to group")
    index = torch.arange(latent_frames * per_latent, device=features.device).clamp(max=v - 1)
    return features.index_select(1, index).unflatten(1, (latent_frames, per_latent))


def group_for_family(features: torch.Tensor, latent_frames: int, per_latent: int, family: str) -> torch.Tensor:
    """A clip's per-video-frame features ``[B, V, ...]`` -> ``[B, latent_frames, per_latent, ...]`` as the model family
    pairs video and latent frames (``wan``: :func:`group_by_latent_frame`; ``s2v``: :func:`group_by_video_frames`),
    so that slicing latent frames slices the audio with them."""
    group = group_by_video_frames if family == "s2v" else group_by_latent_frame
    return group(features, latent_frames, per_latent)


def blocks_for(video_frames: int, frames_per_block: int, per_latent: int = 4) -> int:
    """Blocks of ``frames_per_block`` latent frames needed to cover ``video_frames`` (the last one padded)."""
    return math.ceil(latent_frames_for(video_frames, per_latent) / frames_per_block)


def split_into_blocks(features: torch.Tensor, frames_per_block: int, per_latent: int = 4) -> list[torch.Tensor]:
    """Per-video-frame features ``[B, V, ...]`` -> one tensor ``[B, frames_per_block, per_latent, ...]`` per block,
    what the engines consume block by block (the last block repeats the final video frame as padding)."""
    blocks = blocks_for(features.shape[1], frames_per_block, per_latent)
    grouped = group_by_latent_frame(features, blocks * frames_per_block, per_latent)
    return [grouped[:, b * frames_per_block : (b + 1) * frames_per_block] for b in range(blocks)]


def split_video_frames(features: torch.Tensor, frames_per_block: int, per_latent: int = 4,
                       blocks: int | None = None) -> list[torch.Tensor]:
    """Per-video-frame features ``[B, V, ...]`` -> ``[B, per_latent * frames_per_block, ...]`` per block: block ``b``
    takes video frames ``per_latent * frames_per_block * b`` onwards (latent frame ``j`` <-> video frames
    ``per_latent * j .. per_latent * j + per_latent - 1``, as Wan2.2-S2V and Live Avatar's release pair them);
    missing trailing frames repeat the last one. ``blocks`` defaults to the blocks that hold all ``V`` frames."""
    v = features.shape[1]
    if v == 0:
        raise ValueError("no audio features to split")
    size = per_latent * frames_per_block
    blocks = math.ceil(v / size) if blocks is None else blocks
    index = torch.arange(blocks * size, device=features.device).clamp(max=v - 1)
    return list(features.index_select(1, index).split(size, dim=1))


def _as_waveform(waveform: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Any 1-D audio -> float32 ``[samples]`` on ``device`` (a tensor already there is not copied)."""
    if not isinstance(waveform, torch.Tensor):
        waveform = torch.from_numpy(np.asarray(waveform, dtype=np.float32))
    return waveform.to(device, torch.float32).flatten()


# 10 log10(p) = DECIBELS_PER_NEPER * ln(p): decibels from a natural log of power.
DECIBELS_PER_NEPER = 10.0 / math.log(10.0)


class AudioProjection(nn.Module):
    """Features ``[B, V, layers, feat]`` -> audio tokens ``[B, F, per_latent, audio_dim]`` (``audio_proj.*``).

    A learned softmax mix of the encoder's layers, a LayerNorm (``audio_feature_norm="layer"``; none with
    ``"none"``), and a two-layer MLP; each latent frame gets one token per video frame it covers.
    """

    def __init__(self, cfg):
        super().__init__()
        self.per_latent = cfg.video_frames_per_latent
        self.layer_weights = nn.Parameter(torch.zeros(cfg.audio_layers_in))
        self.feature_dim = cfg.audio_feature_dim
        self.norm = nn.LayerNorm(cfg.audio_feature_dim) if cfg.audio_feature_norm == "layer" else nn.Identity()
        self.proj = nn.Sequential(
            nn.Linear(cfg.audio_feature_dim, cfg.audio_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.audio_dim, cfg.audio_dim)
        )

    def _check(self, features: torch.Tensor, dims: int, layout: str) -> None:
        layers, width = self.layer_weights.numel(), self.feature_dim
        if features.dim() != dims or tuple(features.shape[-2:]) != (layers, width):
            raise ValueError(f"audio features of shape {tuple(features.shape)} do not fit the model "
                             f"(expected [{layout}, {layers}, {width}])")

    def forward(self, features: torch.Tensor, latent_frames: int | None = None) -> torch.Tensor:
        self._check(features, 4, "B, video_frames")
        if latent_frames is None:
            latent_frames = latent_frames_for(features.shape[1], self.per_latent)
        return self.project_grouped(group_by_latent_frame(features, latent_frames, self.per_latent))

    def project_grouped(self, grouped: torch.Tensor) -> torch.Tensor:
        """``[B, F, per_latent, layers, feat]`` -> ``[B, F, per_latent, audio_dim]``."""
        self._check(grouped, 5, "B, F, per_latent")
        weights = self.layer_weights.softmax(0).to(grouped.dtype)
        mixed = (grouped * weights[:, None]).sum(-2)
        return self.proj(self.norm(mixed.to(self.proj[0].weight.dtype)))


class Wav2Vec2Features:
    """wav2vec2 (transformers ``Wav2Vec2Model``, loaded offline from a local folder): all hidden states,
    resampled from the encoder's 50 Hz to the video frame rate. Output ``[1, V, layers + 1, hidden]``."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"audio encoder: {path} is not a wav2vec2 folder (no config.json)")
        self.model = Wav2Vec2Model.from_pretrained(path, local_files_only=True).to(device, dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers + 1
        self.feature_dim = cfg.hidden_size

    @torch.no_grad()
    def __call__(self, waveform: np.ndarray | torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """``waveform`` ``[samples]`` mono at 16 kHz -> ``[1, V, layers, hidden]`` with ``V = frames`` or the
        number of video frames the audio covers."""
        wav = _as_waveform(waveform, self.device)
        frames = frames or video_frames_for(wav.numel())
        # The normalisation of Wav2Vec2FeatureExtractor (do_normalize=True): zero mean, unit variance.
        wav = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
        out = self.model(wav[None].to(self.dtype), output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=2)  # [1, T50, layers, hidden]
        return resample_frames(hidden.float(), frames)


class EnergyMelFeatures:
    """A cheap, weight-free extractor for the toy world: log-mel energies plus log RMS energy of the audio
    window of each video frame, in units of 20 dB (so about -3 for silence, 0-1 for loud speech: a scale an MLP
    takes as it is; the level is the loudness, which ``model.dit.audio_feature_norm=none`` keeps).
    Output ``[1, V, 1, n_mels + 1]``."""

    def __init__(self, n_mels: int = 31, sample_rate: int = SAMPLE_RATE, fps: float = VIDEO_FPS,
                 device: str | torch.device = "cpu"):
        from transformers.audio_utils import mel_filter_bank

        self.sample_rate, self.fps, self.n_mels = sample_rate, fps, n_mels
        self.hop = int(round(sample_rate / fps))
        self.n_fft = 1 << (2 * self.hop - 1).bit_length()
        banks = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=50.0,
            max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney",
        )
        self.device = torch.device(device)
        self.mel = torch.tensor(banks, dtype=torch.float32, device=self.device)  # [bins, n_mels]
        self.window = torch.hann_window(2 * self.hop, device=self.device)
        self.num_layers = 1
        self.feature_dim = n_mels + 1

    def __call__(self, waveform: np.ndarray | torch.Tensor, frames: int | None = None) -> torch.Tensor:
        wav = _as_waveform(waveform, self.device)
        frames = frames or video_frames_for(wav.numel(), self.sample_rate, self.fps)
        # One analysis window of two hops centred on each video frame.
        padded = F.pad(wav, (self.hop, self.n_fft))
        windows = padded.unfold(0, 2 * self.hop, self.hop)[:frames]
        if windows.shape[0] < frames:
            windows = F.pad(windows, (0, 0, 0, frames - windows.shape[0]))
        spec = torch.fft.rfft(windows * self.window, n=self.n_fft).abs().pow(2)
        logmel = torch.log(spec @ self.mel + 1e-6)
        energy = torch.log(windows.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (torch.cat([logmel, energy], dim=-1) * DECIBELS_PER_NEPER / 20.0)[None, :, None, :]
