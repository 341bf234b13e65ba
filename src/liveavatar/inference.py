"""``infer.py``: stream a video for a config and write it out, then report time to first frame, real-time factor
and frames per second. The engines on one device (``sequential``, ``stream_batch``) stream through
:class:`~liveavatar.pipeline.LiveAvatarPipeline`; ``tpp`` (one rank per denoising step, under torchrun) prepares
through :class:`~liveavatar.tpp_pipeline.TPPPipeline` (one request).

Every user mistake (a missing image, unreadable audio, a checkpoint that does not fit) becomes a
:class:`UserError` with one line that names the input; ``infer.py`` prints it and exits with status 2.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from . import atomic, media
from .components import SAMPLE_RATE, UserError, resolve_device, resolve_dtype
from .pipeline import LiveAvatarPipeline, StreamBlock, engine_settings, load_model, warn

__all__ = ["ENGINES", "RunReport", "UserError", "engine_settings", "load_model", "resolve_device", "resolve_dtype",
           "run", "run_tpp", "warn", "write_video"]

ENGINES = ("sequential", "stream_batch", "tpp")


@dataclass
class RunReport:
    path: Path
    frames: int
    seconds_of_video: float
    first_frame_s: float
    generation_s: float
    block_times: list[float] = field(default_factory=list)  # seconds from the start to each decoded block
    ranks: list[dict] = field(default_factory=list)         # TPP: per-rank compute/wait/send seconds

    @property
    def rtf(self) -> float:
        """Generation time over video duration (below 1: faster than real time)."""
        return self.generation_s / self.seconds_of_video

    @property
    def fps(self) -> float:
        return self.frames / self.generation_s

    def save(self, path: str | Path) -> None:
        """Write the figures as JSON (atomically)."""
        data = {**asdict(self), "path": str(self.path), "rtf": self.rtf, "fps": self.fps}
        atomic.write_json(path, data)

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.frames} frames, {self.seconds_of_video:.2f} s): time to first frame "
                f"{self.first_frame_s:.2f} s, real-time factor {self.rtf:.2f}, {self.fps:.1f} frames/s")


def write_video(cfg: DictConfig, blocks: Iterable[StreamBlock], fps: float, wav: np.ndarray,
                total: int | None) -> RunReport:
    """Write decoded blocks to ``output.path`` (with ``wav`` muxed in; ``output.frames``: the exact uint8 frames
    too) as they arrive, with a progress bar over ``total`` blocks, and time the run."""
    out_path = Path(cfg.output.path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames_path = out_path.with_suffix(".frames.npy") if cfg.output.frames else None
    written, block_times = 0, []
    start = time.perf_counter()
    with media.VideoWriter(out_path, fps=fps, audio=wav, sample_rate=SAMPLE_RATE, frames_path=frames_path) as writer:
        for _, frames in tqdm(blocks, total=total, unit="block", desc="generating"):
            writer.write(frames)
            written += frames.shape[0]
            block_times.append(time.perf_counter() - start)
    generation_s = time.perf_counter() - start
    return RunReport(out_path, written, written / fps, block_times[0] if block_times else generation_s,
                     generation_s, block_times)


def run(cfg: DictConfig) -> RunReport | None:
    """Generate a video for ``cfg`` (see ``conf/infer.yaml``) and return the measured figures (None on the
    ranks of a TPP run that do not write the output)."""
    if cfg.engine.name == "tpp":
        return run_tpp(cfg)
    pipe = LiveAvatarPipeline.from_config(cfg)
    stream = pipe.stream(cfg.image, cfg.audio, max_seconds=cfg.max_seconds, listen_audio=cfg.get("listen_audio"),
                         audio_mask=cfg.get("audio_mask"))
    return write_video(cfg, stream, stream.fps, stream.audio, stream.blocks)


def run_tpp(cfg: DictConfig) -> RunReport | None:
    """This rank's part of a TPP run (launched by torchrun; see :mod:`liveavatar.engine.tpp`): one request of a
    :class:`~liveavatar.tpp_pipeline.TPPPipeline`, written by the output rank with every rank's timing."""
    from .engine import tpp
    from .tpp_pipeline import TPPPipeline

    pipe = TPPPipeline(cfg)
    try:
        stream = pipe.stream(cfg.image, cfg.audio, max_seconds=cfg.max_seconds, listen_audio=cfg.get("listen_audio"),
                             audio_mask=cfg.get("audio_mask"))
        report = write_video(cfg, stream, stream.fps, stream.audio, stream.blocks) if stream is not None else None
        stats = pipe.rank_stats()
        if report is not None:
            print(tpp.stats_table(stats))
            report.ranks = [{**r.__dict__, "wait_share": r.wait_share} for r in stats]
    finally:
        pipe.close()
    return report
