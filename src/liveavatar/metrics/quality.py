"""Frame quality against ground truth (PSNR, SSIM) and on its own (sharpness). Videos ``[3, T, H, W]`` in [-1, 1];
the data range is therefore 2. Over the frames both videos have."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .frames import as_video, luma

DATA_RANGE = 2.0
PSNR_CAP = 100.0   # identical frames: a finite value, so means over frames stay finite


def psnr(video, truth) -> torch.Tensor:
    """Per-frame PSNR in dB ``[T]`` over all three channels (capped at ``PSNR_CAP`` for identical frames)."""
    a, b = as_video(video), as_video(truth)
    t = min(a.shape[1], b.shape[1])
    mse = (a[:, :t] - b[:, :t]).pow(2).mean(dim=(0, 2, 3))
    value = 10 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-30))
    return value.clamp(max=PSNR_CAP)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]   # [1, 1, size, size]


def ssim(video, truth, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-frame SSIM ``[T]`` on luma (Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03,
    statistics over the valid part of the frame). Frames smaller than the window use a window of their size."""
    a, b = luma(as_video(video)), luma(as_video(truth))
    t = min(a.shape[0], b.shape[0])
    a, b = a[:t, None], b[:t, None]                       # [T, 1, H, W]
    size = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, sigma)
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = (k1 * DATA_RANGE) ** 2, (k2 * DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def sharpness(video) -> torch.Tensor:
    """Per-frame variance of the Laplacian of luma ``[T]`` (higher: sharper; 0 for a flat frame)."""
    y = luma(as_video(video))[:, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=y.dtype)[None, None]
    return F.conv2d(y, kernel).var(dim=(1, 2, 3), unbiased=False)
