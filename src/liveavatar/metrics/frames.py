"""Video conversions shared by the weight-free metrics: videos ``[3, T, H, W]`` float in [-1, 1] (torch or numpy)
become float64 torch tensors; luma is BT.601 (what PSNR/SSIM and sharpness conventionally use)."""
from __future__ import annotations

import numpy as np
import torch

LUMA = (0.299, 0.587, 0.114)


def as_video(video) -> torch.Tensor:
    """``[3, T, H, W]`` float64 (an image ``[3, H, W]`` becomes a one-frame video)."""
    x = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).detach().cpu().double()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] or an image [3, H, W], got {tuple(x.shape)}")
    return x


def luma(video: torch.Tensor) -> torch.Tensor:
    """``[T, H, W]`` luma of a ``[3, T, H, W]`` video (same range)."""
    w = torch.tensor(LUMA, dtype=video.dtype)
    return torch.einsum("c,cthw->thw", w, video)
