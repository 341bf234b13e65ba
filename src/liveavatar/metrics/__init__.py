"""Measures of generated videos: the toy world's exact lip-sync and identity measures (``toy``) and GenBench's
weight-free metrics (``quality``: PSNR, SSIM, sharpness; ``temporal``: T.Flicker; ``drift``: colour and histogram
drift against the reference)."""
from .drift import colour_drift, histogram_drift, trend
from .quality import psnr, sharpness, ssim
from .temporal import temporal_flicker

__all__ = ["colour_drift", "histogram_drift", "psnr", "sharpness", "ssim", "temporal_flicker", "trend"]
