"""Stream a model over held-out toy-world clips and score what it makes.

Each clip gives a reference image and an audio track; the model (any preset with the patch VAE and the
energy-mel audio features, i.e. ``model=tiny``) streams a video for it through
:class:`~liveavatar.pipeline.LiveAvatarPipeline`, with the components :mod:`liveavatar.components` builds for the
preset -- exactly as ``infer.py`` streams; :mod:`liveavatar.metrics.toy` then measures lip sync against the audio
and identity error against the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..components import SAMPLE_RATE, Components, toy_preset
from ..data import toy
from ..engine.stream import EngineSettings
from ..metrics.toy import identity_error, score_video
from ..models import AvatarDiT
from ..pipeline import LiveAvatarPipeline

# Far from the training seeds (``data.seed`` small integers times 1_000_003 plus an index below 10^6).
HELD_OUT_SEED = 987_654_321


@dataclass
class ToyBenchSettings:
    clips: int = 4                      # held-out clips
    seconds: float = 4.0                # audio per clip
    seed: int = HELD_OUT_SEED           # first clip's seed
    resolution: tuple[int, int] = (32, 32)
    space_factor: int = 2
    n_mels: int = 31
    prompt: str = "a person talking to the camera"
    noise_seed: int = 0
    fps: float = toy.FPS                # of the clips and of the streamed video (the preset's model.fps)

    def preset(self, model: AvatarDiT) -> dict:
        """The component part of the model preset these settings describe, for ``model``'s DiT."""
        return toy_preset(model.config, self.resolution, self.space_factor, self.n_mels, self.fps)

    @property
    def frames(self) -> int:
        """Video frames per clip."""
        return int(self.seconds * self.fps)


@dataclass
class ClipResult:
    seed: int
    scores: dict[str, float]
    identity_per_frame: list[float] = field(repr=False)
    video: torch.Tensor | None = field(default=None, repr=False)   # [3, T, H, W] in [-1, 1]
    wav: np.ndarray | None = field(default=None, repr=False)


def toy_pipeline(model: AvatarDiT, engine: EngineSettings, bench: ToyBenchSettings) -> LiveAvatarPipeline:
    """``model`` loaded once, with the toy preset's components on its device, streaming with the sequential
    engine at ``bench.noise_seed``."""
    device = next(model.parameters()).device
    return LiveAvatarPipeline(model, Components(bench.preset(model), device), engine, seed=bench.noise_seed,
                              prompt=bench.prompt)


@torch.no_grad()
def stream_video(model: AvatarDiT, reference: torch.Tensor, wav: np.ndarray, engine: EngineSettings,
                 bench: ToyBenchSettings, pipeline: LiveAvatarPipeline | None = None) -> torch.Tensor:
    """Stream a video for ``reference`` ``[3, H, W]`` and ``wav`` (mono at 16 kHz) -> ``[3, T, H, W]`` in [-1, 1]
    (``pipeline``: an already loaded :func:`toy_pipeline` of ``model``)."""
    pipe = pipeline or toy_pipeline(model, engine, bench)
    frames = [block.frames for block in pipe.stream(reference, wav)]  # each [T, 3, H, W]
    return torch.cat(frames).transpose(0, 1)


def run_toy_bench(model: AvatarDiT, engine: EngineSettings, bench: ToyBenchSettings,
                  keep_videos: bool = False, progress=None) -> list[ClipResult]:
    """Stream and score ``bench.clips`` held-out clips; ``progress`` is an optional callable(done, total)."""
    pipe = toy_pipeline(model, engine, bench)
    results = []
    for i in range(bench.clips):
        seed = bench.seed + i
        clip = toy.make_clip(seed, bench.frames, size=tuple(bench.resolution), fps=bench.fps, sample_rate=SAMPLE_RATE)
        video = stream_video(model, clip.reference, clip.wav, engine, bench, pipe)
        scores = score_video(video, clip.reference, clip.wav, SAMPLE_RATE, bench.fps).to_dict()
        per_frame = identity_error(video, clip.reference)
        results.append(ClipResult(seed, scores, [float(v) for v in per_frame],
                                  video if keep_videos else None, clip.wav if keep_videos else None))
        if progress is not None:
            progress(i + 1, bench.clips)
    return results


def summarise(results: list[ClipResult]) -> dict[str, float]:
    """Mean of every score over the clips."""
    keys = results[0].scores.keys()
    return {k: float(np.mean([r.scores[k] for r in results])) for k in keys}
