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


def dino_metric(dino) -> callable:
    """Dino-S of every frame to the reference: mean and trend (last quarter minus first)."""
    def score(video, reference, wav, fps, truth) -> dict[str, float]:
        per_frame = dino.score(video, reference)
        return {"dino_s": float(per_frame.mean()), "dino_s_trend": metrics.trend(per_frame)}

    return score


def general_metrics(paths) -> list:
    """The metrics for every case: the weight-free ones, and Dino-S when ``paths.dino`` names a DINOv2 folder. A
    missing folder is one warning and the others still run. Sync-C/D, FID and FVD are not built yet: naming their
    weights says so once."""
    import sys

    from ..metrics.weights import MissingWeights

    paths = dict(paths or {})
    out = [appearance, against_truth]
    if paths.get("dino"):
        from ..metrics.dino import DinoSimilarity

        try:
            out.append(dino_metric(DinoSimilarity.from_pretrained(paths["dino"])))
        except MissingWeights as err:
            print(f"warning: {err}; scoring without it", file=sys.stderr)
    later = [k for k in ("syncnet", "inception", "i3d") if paths.get(k)]
    if later:
        print(f"warning: metrics.{', metrics.'.join(later)}: not implemented yet; scoring without them",
              file=sys.stderr)
    return out
