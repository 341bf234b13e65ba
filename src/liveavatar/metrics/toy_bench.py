"""Stream a model over held-out toy-world clips and score what it makes.

Each clip gives a reference image and an audio track; the model (any preset with the patch VAE and the
energy-mel audio features, i.e. ``model=tiny``) streams a video for it with an engine, block by block, exactly
as ``infer.py`` does; :mod:`liveavatar.metrics.toy` then measures lip sync against the audio and identity error
against the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import toy
from ..engine.stream import EngineSettings, SequentialEngine, StreamCore
from ..models import AvatarDiT
from ..models.audio import EnergyMelFeatures, split_into_blocks
from ..models.text import RandomTextEncoder
from ..models.vae import PatchVAE
from .toy import score_video, identity_error

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


@dataclass
class ClipResult:
    seed: int
    scores: dict[str, float]
    identity_per_frame: list[float] = field(repr=False)
    video: torch.Tensor | None = field(default=None, repr=False)   # [3, T, H, W] in [-1, 1]
    wav: np.ndarray | None = field(default=None, repr=False)


@torch.no_grad()
def stream_video(model: AvatarDiT, reference: torch.Tensor, wav: np.ndarray, engine: EngineSettings,
                 bench: ToyBenchSettings) -> torch.Tensor:
    """Stream a video for ``reference`` ``[3, H, W]`` and ``wav`` (16 kHz) -> ``[3, T, H, W]`` in [-1, 1]."""
    cfg = model.config
    vae = PatchVAE(bench.space_factor)
    device = next(model.parameters()).device
    ref_latent = vae.encode(reference[None, :, None].to(device))
    frames = len(wav) * toy.FPS // toy.SAMPLE_RATE
    features = EnergyMelFeatures(n_mels=bench.n_mels)(wav, frames)
    audio_blocks = split_into_blocks(features, cfg.frames_per_block, cfg.video_frames_per_latent)
    context, _ = RandomTextEncoder(cfg.text_dim, cfg.text_len)([bench.prompt])
    core = StreamCore(model, engine, tuple(ref_latent.shape[i] for i in (1, 3, 4)), context, ref_latent,
                      seed=bench.noise_seed)
    decoder = vae.stream_decoder()
    chunks = [decoder.decode(x0)[0] for _, x0 in SequentialEngine(core).stream(audio_blocks)]
    return torch.cat(chunks, dim=1)[:, :frames].float().cpu()


def run_toy_bench(model: AvatarDiT, engine: EngineSettings, bench: ToyBenchSettings,
                  keep_videos: bool = False, progress=None) -> list[ClipResult]:
    """Stream and score ``bench.clips`` held-out clips; ``progress`` is an optional callable(done, total)."""
    results = []
    frames = int(bench.seconds * toy.FPS)
    for i in range(bench.clips):
        seed = bench.seed + i
        clip = toy.make_clip(seed, frames, size=tuple(bench.resolution))
        video = stream_video(model, clip.reference, clip.wav, engine, bench)
        scores = score_video(video, clip.reference, clip.wav).to_dict()
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
