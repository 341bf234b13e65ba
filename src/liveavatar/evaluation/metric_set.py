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


def sync_metric(syncnet) -> callable:
    """Sync-C / Sync-D and the offset (frames) of the whole video or window; None at other frame rates."""
    from ..components import SAMPLE_RATE
    from ..metrics.syncnet import SYNCNET_FPS, WINDOW, sync_scores

    def score(video, reference, wav, fps, truth) -> dict[str, float] | None:
        if abs(fps - SYNCNET_FPS) > 1e-6 or video.shape[1] <= WINDOW:
            return None
        s = sync_scores(syncnet, video, wav, SAMPLE_RATE, fps)
        return {"sync_c": s.sync_c, "sync_d": s.sync_d, "sync_offset": float(s.offset)}

    return score


def qalign_metric(qalign) -> callable:
    """IQA and ASE (Q-Align), each the mean over evenly spread frames."""
    def score(video, reference, wav, fps, truth) -> dict[str, float]:
        return qalign(video)

    return score


def general_metrics(paths) -> list:
    """The metrics for every case: the weight-free ones, Dino-S when ``paths.dino`` names a DINOv2 folder, Sync-C/D
    when ``paths.syncnet`` names the SyncNet weights, IQA / ASE when ``paths.qalign`` names a Q-Align folder (GPU).
    Missing weights are one warning and the others still run. The set-level metrics are :func:`video_features`
    (FVD) and :func:`frame_features` (FID)."""
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
    if paths.get("syncnet"):
        from ..metrics.syncnet import SyncNet

        try:
            out.append(sync_metric(SyncNet.from_file(paths["syncnet"])))
        except (MissingWeights, ValueError) as err:
            print(f"warning: {err}; scoring without it", file=sys.stderr)
    if paths.get("qalign"):
        from ..metrics.qalign import QAlign

        try:
            qalign = QAlign.from_pretrained(paths["qalign"], frames=int(paths.get("qalign_frames") or 8))
            out.append(qalign_metric(qalign))
        except MissingWeights as err:
            print(f"warning: {err}; scoring without it", file=sys.stderr)
    return out


def video_features(paths):
    """FVD's I3D features (``paths.i3d``), applied to each case's video and its ground truth; None without it."""
    import sys

    from ..metrics.weights import MissingWeights

    if not dict(paths or {}).get("i3d"):
        return None
    from ..metrics.i3d import I3DFeatures

    try:
        return I3DFeatures.from_file(paths["i3d"])
    except MissingWeights as err:
        print(f"warning: {err}; scoring without it", file=sys.stderr)
        return None


def frame_features(paths):
    """FID's InceptionV3 pool features (``paths.inception``) of a video's frames (``paths.fid_frames`` of them,
    evenly spread); None without it."""
    import sys

    from ..metrics.weights import MissingWeights

    if not dict(paths or {}).get("inception"):
        return None
    from ..metrics.inception import InceptionFeatures

    try:
        return InceptionFeatures.from_file(paths["inception"], max_frames=int(paths.get("fid_frames") or 32))
    except MissingWeights as err:
        print(f"warning: {err}; scoring without it", file=sys.stderr)
        return None
