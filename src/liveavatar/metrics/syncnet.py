"""Sync-C / Sync-D: audio-visual sync with SyncNet (Chung & Zisserman 2016), as the avatar papers report it.

The module has the layers and parameter names of the released model (``syncnet_v2.model``, a state dict of
``netcnnaud``, ``netfcaud``, ``netcnnlip``, ``netfclip``) so those weights load strictly from a local file. Scoring:

- lips: windows of 5 consecutive frames of the face crop, 224x224, BGR on the 0..255 scale (what the weights saw);
  the crop is a given box ``(top, left, height, width)`` in pixels, or, for avatar framing without a face detector,
  the largest centred square of the frame;
- audio: 0.2 s of MFCCs (20 rows of :func:`~liveavatar.metrics.mfcc.mfcc`, 4 per video frame at 25 fps) per window;
- the distance between lip and audio embeddings for every offset in ``-max_offset..max_offset`` frames (the audio
  embeddings zero-padded at the ends), averaged over windows: Sync-D is the smallest mean distance, Sync-C the median
  minus that minimum, and the offset is where it falls. ``offset = k > 0``: the lips at frame i match the audio
  at frame i - k (the video lags the audio by k frames).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..media import SAMPLE_RATE, VIDEO_FPS
from .frames import as_video
from .mfcc import mfcc
from .weights import require_path

WINDOW, MFCC_PER_FRAME, SIZE = 5, 4, 224
# SyncNet was trained on video at the project's default rate (4 MFCC rows of 10 ms per frame): nothing else fits.
SYNCNET_FPS = VIDEO_FPS


def _conv_block(conv: nn.Module, channels: int, norm, pool: nn.Module | None = None) -> list[nn.Module]:
    """conv, batch norm, ReLU (and a pool): four indices per pooled block, three otherwise, as the weights expect."""
    return [conv, norm(channels), nn.ReLU(inplace=True)] + ([pool] if pool is not None else [])


class SyncNet(nn.Module):
    """The two SyncNet encoders: MFCC windows ``[N, 1, 13, 20]`` and lip windows ``[N, 3, 5, 224, 224]`` to
    ``[N, embedding]`` vectors."""

    def __init__(self, embedding: int = 1024):
        super().__init__()
        c2, b2 = nn.Conv2d, nn.BatchNorm2d
        self.netcnnaud = nn.Sequential(
            *_conv_block(c2(1, 64, 3, padding=1), 64, b2, nn.MaxPool2d(1, 1)),
            *_conv_block(c2(64, 192, 3, padding=1), 192, b2, nn.MaxPool2d(3, (1, 2))),
            *_conv_block(c2(192, 384, 3, padding=1), 384, b2),
            *_conv_block(c2(384, 256, 3, padding=1), 256, b2),
            *_conv_block(c2(256, 256, 3, padding=1), 256, b2, nn.MaxPool2d(3, 2)),
            *_conv_block(c2(256, 512, (5, 4)), 512, b2),
        )
        c3, b3 = nn.Conv3d, nn.BatchNorm3d
        self.netcnnlip = nn.Sequential(
            *_conv_block(c3(3, 96, (5, 7, 7), stride=(1, 2, 2)), 96, b3, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_block(c3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), 256, b3,
                         nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1))),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_conv_block(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3, nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_block(c3(256, 512, (1, 6, 6)), 512, b3),
        )
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))

    def forward_audio(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lips(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))

    @classmethod
    def from_file(cls, path, key: str = "metrics.syncnet") -> "SyncNet":
        """The released weights (a state dict) from a local file, strictly; eval mode."""
        file = require_path("Sync-C/Sync-D", key, path, "syncnet_v2.model (the SyncNet authors' release)")
        state = torch.load(file, map_location="cpu", weights_only=True)
        model = cls()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Sync-C/Sync-D: {file} does not match SyncNet (missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]})")
        return model.eval()


@dataclass
class SyncScores:
    offset: int          # frames; > 0: the video lags the audio
    sync_c: float        # confidence: median minus minimum mean distance (higher is better)
    sync_d: float        # minimum mean distance (lower is better)
    distances: np.ndarray  # mean distance per offset, from -max_offset to +max_offset


def offset_search(lips: torch.Tensor, audio: torch.Tensor, max_offset: int = 15) -> SyncScores:
    """Scores from embeddings ``lips [N, D]`` and ``audio [N, D]`` of the same windows."""
    n, m = len(lips), max_offset
    padded = F.pad(audio, (0, 0, m, m))
    # distances[i, j]: lips of window i against the audio of window i + j - m.
    distances = torch.stack([F.pairwise_distance(lips[i : i + 1].expand(2 * m + 1, -1), padded[i : i + 2 * m + 1])
                             for i in range(n)])
    mean = distances.mean(0)
    best = int(mean.argmin())
    return SyncScores(offset=m - best, sync_c=float(mean.median() - mean[best]), sync_d=float(mean[best]),
                      distances=mean.flip(0).numpy())


def lip_frames(video, crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``[1, 3, T, 224, 224]`` BGR on 0..255 from a video ``[3, T, H, W]`` in [-1, 1] (RGB)."""
    v = as_video(video).float()
    _, _, h, w = v.shape
    if crop is None:
        side = min(h, w)
        crop = ((h - side) // 2, (w - side) // 2, side, side)
    top, left, ch, cw = crop
    v = v[:, :, top : top + ch, left : left + cw].transpose(0, 1)       # [T, 3, ch, cw]
    v = F.interpolate(v, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    v = (v.clamp(-1, 1) + 1) * 127.5
    return v.flip(1).transpose(0, 1)[None]


@torch.no_grad()
def sync_scores(model: SyncNet, video, wav: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: float = SYNCNET_FPS,
                crop=None, max_offset: int = 15, batch: int = 16) -> SyncScores:
    """Sync-C / Sync-D of a video ``[3, T, H, W]`` and its audio (the MFCC framing assumes 25 fps)."""
    if abs(fps - SYNCNET_FPS) > 1e-6:
        raise ValueError(f"Sync-C/Sync-D: SyncNet's windows assume {SYNCNET_FPS:g} fps video, got {fps}")
    frames = lip_frames(video, crop)
    cepstra = torch.from_numpy(mfcc(wav, sample_rate).T.astype(np.float32))   # [13, F]
    n = min(frames.shape[2], cepstra.shape[1] // MFCC_PER_FRAME) - WINDOW
    if n < 1:
        raise ValueError(f"Sync-C/Sync-D: needs more than {WINDOW} frames of video and audio")
    lips, audio = [], []
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        lips.append(model.forward_lips(torch.cat([frames[:, :, i : i + WINDOW] for i in idx])))
        audio.append(model.forward_audio(torch.stack(
            [cepstra[None, :, i * MFCC_PER_FRAME : i * MFCC_PER_FRAME + WINDOW * MFCC_PER_FRAME] for i in idx])))
    return offset_search(torch.cat(lips), torch.cat(audio), max_offset)
