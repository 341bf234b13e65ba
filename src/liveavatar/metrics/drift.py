"""Appearance drift against the reference image, per frame: colour (mean RGB) and histogram distance. Long runs
that lose the identity tend to drift in both; the curves' end-minus-start says whether it grows. Videos
``[3, T, H, W]``, images ``[3, H, W]``, in [-1, 1]."""
from __future__ import annotations

import torch

from .frames import as_video

BINS = 32


def colour_drift(video, reference) -> torch.Tensor:
    """Per frame ``[T]``: L2 distance between the frame's mean RGB and the reference's (in [-1, 1] units)."""
    v, r = as_video(video), as_video(reference)
    return (v.mean(dim=(2, 3)) - r.mean(dim=(2, 3))).norm(dim=0)


def _histograms(video: torch.Tensor, bins: int) -> torch.Tensor:
    """``[T, 3, bins]`` normalised per-channel histograms over [-1, 1]."""
    idx = ((video.clamp(-1, 1) + 1) / 2 * bins).long().clamp(max=bins - 1)   # [3, T, H, W]
    c, t = idx.shape[:2]
    flat = idx.reshape(c, t, -1)
    counts = torch.zeros(c, t, bins, dtype=torch.float64).scatter_add_(2, flat, torch.ones_like(flat, dtype=torch.float64))
    return (counts / flat.shape[-1]).transpose(0, 1)


def histogram_drift(video, reference, bins: int = BINS) -> torch.Tensor:
    """Per frame ``[T]``: half the L1 distance between its per-channel histograms and the reference's, averaged over
    channels: 0 for the same distribution, 1 for disjoint ones."""
    h = _histograms(as_video(video), bins)
    r = _histograms(as_video(reference), bins)
    return 0.5 * (h - r).abs().sum(dim=-1).mean(dim=-1)


def trend(curve: torch.Tensor) -> float:
    """How much a per-frame curve grows: the mean of its last quarter minus the mean of its first quarter."""
    q = max(1, len(curve) // 4)
    return float(curve[-q:].mean() - curve[:q].mean())
