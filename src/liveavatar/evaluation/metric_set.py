"""The metrics GenBench applies to every case (the toy measures are added for toy cases by the scorer).

Each entry maps ``(video [3, T, H, W], reference [3, H, W], wav, fps, truth [3, T', H, W] | None)`` to a dict of
named floats, or None where it does not apply (PSNR/SSIM without ground truth)."""
from __future__ import annotations

from .. import metrics


def appearance(video, reference, wav, fps, truth) -> dict[str, float]:
    colour = metrics.colour_drift(video, reference)
    return {"flicker": metrics.temporal_flicker(video), "sharpness": float(metrics.sharpness(video).mean()),
            "colour_drift": float(colour.mean()), "colour_trend": metrics.trend(colour),
            "histogram_drift": float(metrics.histogram_drift(video, reference).mean())}


def against_truth(video, reference, wav, fps, truth) -> dict[str, float] | None:
    if truth is None:
        return None
    return {"psnr": float(metrics.psnr(video, truth).mean()), "ssim": float(metrics.ssim(video, truth).mean())}


def general_metrics(paths) -> list:
    """The weight-free metrics for every case. Weighted metrics (Dino-S, Sync-C/D, FID, FVD; ``paths`` names their
    weights) are not built yet: naming a path says so once instead of silently skipping."""
    named = {k: v for k, v in dict(paths or {}).items() if v}
    if named:
        import sys

        print(f"warning: metrics.{', metrics.'.join(named)}: weighted metrics are not implemented yet; "
              "scoring with the weight-free ones", file=sys.stderr)
    return [appearance, against_truth]
