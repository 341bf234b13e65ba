"""Temporal stability: VBench's T.Flicker. Videos ``[3, T, H, W]`` in [-1, 1]."""
from __future__ import annotations

import torch

from .frames import as_video


def temporal_flicker(video) -> float:
    """``(255 - mean |frame_t - frame_{t-1}|) / 255`` with frames on the 0..255 scale (VBench); 1.0 for a static
    video, lower for more frame-to-frame change. A one-frame video scores 1."""
    x = (as_video(video) + 1.0) * 127.5
    if x.shape[1] < 2:
        return 1.0
    return float((255.0 - (x[:, 1:] - x[:, :-1]).abs().mean()) / 255.0)
