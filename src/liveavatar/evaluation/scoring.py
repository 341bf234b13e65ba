"""GenBench's scores of one streamed video: the whole video and each time window, with every metric that applies.

Which metrics apply to a case:

- every case: the weight-free measures of :mod:`liveavatar.metrics` against the reference image (T.Flicker,
  colour and histogram drift, sharpness);
- a case with ground truth: PSNR and SSIM against it (over the frames both have);
- a toy case: the toy world's exact lip sync and identity error (:mod:`liveavatar.metrics.toy`);
- weighted metrics (Dino-S, Sync-C/D) when their weights were given (:class:`WeightedMetrics`); a missing
  path is reported once and the other metrics still run.

Windows are ``[start_s, end_s)`` spans of the video (the paper's stress test: 0-10, 100-110, 1000-1010 and
10000-10010 s); a window past the video's end is skipped; each window is scored as a video of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..components import SAMPLE_RATE
from ..metrics import toy as toy_metrics

# Each metric: (name, function(video, reference, wav, fps, truth) -> float | None). None: does not apply.
Metric = Callable[[torch.Tensor, torch.Tensor, np.ndarray, float, "torch.Tensor | None"], "dict[str, float] | None"]


def toy_scores(video, reference, wav, fps, truth) -> dict[str, float]:
    """The toy world's exact measures (lip sync, identity error and drift, flicker)."""
    s = toy_metrics.score_video(video, reference, wav, SAMPLE_RATE, fps)
    return {"lip_sync": s.lip_sync, "identity_error": s.identity_error, "identity_drift": s.identity_drift}


@dataclass
class Scorer:
    """The metrics of one benchmark run: ``general`` for every case, ``toy`` for toy cases."""

    general: list[Metric] = field(default_factory=list)
    toy: list[Metric] = field(default_factory=lambda: [toy_scores])
    video_features: Callable | None = None   # set-level (FVD): list of videos -> [N, D] features
    frame_features: Callable | None = None   # set-level (FID): one video -> [n, D] features of its frames

    def score(self, video: torch.Tensor, reference: torch.Tensor, wav: np.ndarray, fps: float,
              truth: torch.Tensor | None, is_toy: bool) -> dict[str, float]:
        """All applicable metrics of ``video`` ``[3, T, H, W]`` in [-1, 1]; ``reference`` ``[3, H, W]``."""
        out: dict[str, float] = {}
        for metric in self.general + (self.toy if is_toy else []):
            values = metric(video, reference, wav, fps, truth)
            if values:
                out.update({k: float(v) for k, v in values.items()})
        return out


def parse_windows(windows) -> list[tuple[float, float]]:
    """``[[start, end], ...]`` in seconds, each start < end (one-line error otherwise)."""
    out = []
    for w in windows or []:
        if len(w) != 2 or not float(w[0]) < float(w[1]) or float(w[0]) < 0:
            raise ValueError(f"windows: each window is [start_s, end_s] with 0 <= start < end, got {list(w)}")
        out.append((float(w[0]), float(w[1])))
    return out


def window_slices(frames: int, fps: float, windows: list[tuple[float, float]]) -> list[tuple[str, slice, slice]]:
    """``(name, frame slice, audio sample slice)`` of each window that starts inside a video of ``frames``."""
    out = []
    for start, end in windows:
        a, b = int(round(start * fps)), min(frames, int(round(end * fps)))
        if a >= frames or b - a < 2:
            continue
        samples = slice(int(round(a / fps * SAMPLE_RATE)), int(round(b / fps * SAMPLE_RATE)))
        out.append((f"{start:g}-{end:g}s", slice(a, b), samples))
    return out


def score_case(scorer: Scorer, video: torch.Tensor | None, reference: torch.Tensor, wav: np.ndarray, fps: float,
               truth: torch.Tensor | None, is_toy: bool, windows: list[tuple[float, float]],
               window_videos: dict[str, torch.Tensor] | None = None, total_frames: int | None = None) -> dict:
    """``{"whole": {...}, "windows": {"0-10s": {...}, ...}}`` for one streamed video ``[3, T, H, W]``; or, for a
    video too long to hold (``video`` None), only its windows, from ``window_videos`` (name -> that window's
    frames) of a video of ``total_frames`` frames."""
    total = video.shape[1] if video is not None else int(total_frames)
    result = {"whole": scorer.score(video, reference, wav, fps, truth, is_toy) if video is not None else {},
              "windows": {}}
    for name, frames, samples in window_slices(total, fps, windows):
        part = video[:, frames] if video is not None else window_videos[name]
        part_truth = None if truth is None or truth.shape[1] < frames.stop else truth[:, frames]
        result["windows"][name] = scorer.score(part, reference, wav[samples], fps, part_truth, is_toy)
    return result
