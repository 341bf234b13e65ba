"""``infer.py``: stream a video for a config and write it out, then report time to first frame, real-time factor
and frames per second. The engines on one device (``sequential``, ``stream_batch``) stream through
:class:`~liveavatar.pipeline.LiveAvatarPipeline`; ``tpp`` (one rank per denoising step, under torchrun) prepares
its inputs with :func:`prepare`.

Every user mistake (a missing image, unreadable audio, a checkpoint that does not fit) becomes a
:class:`UserError` with one line that names the input; ``infer.py`` prints it and exits with status 2.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from . import atomic, media
from .components import SAMPLE_RATE, Components, UserError, frames_in, resolve_device, resolve_dtype
from .engine.stream import EngineSettings, StreamCore
from .models import AvatarDiT, DiTConfig
from .pipeline import (
    AudioFeatureOptions, LiveAvatarPipeline, StreamBlock, decode_blocks, dit_config, engine_settings, feature_blocks,
    load_model, prompt_context, read_image, read_waveform, warn,
)

__all__ = ["ENGINES", "Prepared", "RunReport", "UserError", "engine_settings", "load_model", "prepare",
           "resolve_device", "resolve_dtype", "run", "run_tpp", "warn", "write_stream", "write_video"]

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


@dataclass
class Prepared:
    """Everything a TPP rank needs before the first block: model (None on a decode-only rank), VAE, reference
    latent ``[1, C, 1, h, w]``, text context ``[1, L, text_dim]``, audio, and the per-block audio features."""

    model: AvatarDiT | None
    dit: DiTConfig
    settings: EngineSettings
    vae: Any
    reference: torch.Tensor
    context: torch.Tensor
    wav: Any
    fps: float
    video_frames: int
    audio_blocks: list

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.reference.shape[1], self.reference.shape[3], self.reference.shape[4])


@torch.no_grad()
def prepare(cfg: DictConfig, with_model: bool = True, device: torch.device | None = None) -> Prepared:
    """Load the parts ``cfg`` names and read the inputs (for a TPP rank); every problem becomes a
    :class:`UserError`."""
    device, dtype = device or resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    try:
        settings = engine_settings(cfg)
    except ValueError as err:
        raise UserError(str(err)) from err
    dit = dit_config(cfg)
    model = load_model(cfg, dit, device, dtype) if with_model else None
    parts = Components(cfg.model, device)
    parts.check(dit)
    options = AudioFeatureOptions.from_config(cfg)

    image = read_image(cfg.image, parts.resolution)
    wav = read_waveform(cfg.audio, cfg.max_seconds)
    video_frames = frames_in(len(wav), parts.fps)
    if video_frames < 1:
        raise UserError(f"audio={cfg.audio}: shorter than one video frame")

    reference = parts.vae.encode(image[None, :, None].to(device)).to(dtype)  # [1, C, 1, h, w]
    prompt = Path(cfg.prompt_embedding) if cfg.get("prompt_embedding") else str(cfg.prompt)
    context = prompt_context(prompt, parts, dit, device)
    extractor = parts.audio_encoder if dit.has_audio else None
    audio_blocks = list(feature_blocks(extractor, wav, video_frames, parts.fps, dit, options))
    return Prepared(model, dit, settings, parts.vae, reference, context, wav, parts.fps, video_frames, audio_blocks)


def new_core(prep: Prepared, cfg: DictConfig, lanes: int | None = None) -> StreamCore:
    try:
        return StreamCore(prep.model, prep.settings, prep.latent_shape, prep.context, prep.reference,
                          seed=int(cfg.seed), lanes=lanes)
    except ValueError as err:
        raise UserError(str(err)) from err


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


def write_stream(cfg: DictConfig, prep: Prepared, blocks) -> RunReport:
    """Decode ``(block, x0)`` pairs as they arrive (streaming VAE decode) and write them (see :func:`write_video`)."""
    return write_video(cfg, decode_blocks(prep.vae, blocks, prep.video_frames), prep.fps, prep.wav,
                       len(prep.audio_blocks))


def run(cfg: DictConfig) -> RunReport | None:
    """Generate a video for ``cfg`` (see ``conf/infer.yaml``) and return the measured figures (None on the
    ranks of a TPP run that do not write the output)."""
    if cfg.engine.name == "tpp":
        return run_tpp(cfg)
    pipe = LiveAvatarPipeline.from_config(cfg)
    stream = pipe.stream(cfg.image, cfg.audio, max_seconds=cfg.max_seconds)
    return write_video(cfg, stream, stream.fps, stream.audio, stream.blocks)


@torch.no_grad()
def run_tpp(cfg: DictConfig) -> RunReport | None:
    """This rank's part of a TPP run (launched by torchrun; see :mod:`liveavatar.engine.tpp`)."""
    import torch.distributed as dist

    from .engine import tpp

    if "RANK" not in os.environ:
        raise UserError("engine=tpp runs under torchrun: torchrun --nproc_per_node=N+1 infer.py engine=tpp ...")
    e = cfg.engine
    layout = tpp.Layout(len(cfg.denoise.steps), bool(e.decode_on_last))
    rank, world, device = tpp.init_process_group(float(e.timeout_s))
    watchdog = tpp.Watchdog(tpp.default_store(), rank, float(e.fault_poll_s))
    role = f"step {rank}" if layout.is_dit(rank) else "decode"
    if rank == layout.output_rank and layout.decode_on_last:
        role += "+decode"
    stats = tpp.RankStats(rank, role)
    channel = tpp.Channel(device, stats)
    try:
        if world != layout.world_size:
            raise UserError(f"engine=tpp with {layout.steps} steps needs {layout.world_size} ranks "
                            f"({layout.steps} DiT ranks{'' if layout.decode_on_last else ' + 1 decoding rank'}); "
                            f"torchrun started {world}")
        if device.type == "cpu":
            torch.set_num_threads(int(e.threads_per_rank))
        prep = prepare(cfg, with_model=layout.is_dit(rank), device=device)
        report = None
        options = tpp.StageOptions(float(e.heartbeat_s), e.simulate_forward_ms)
        if layout.is_dit(rank):
            try:
                stage = tpp.DiTStage(new_core(prep, cfg, lanes=1), rank, layout, channel, options)
            except ValueError as err:
                raise UserError(str(err)) from err
            feed = tpp.AudioFeed(prep.audio_blocks) if rank == 0 else None
            dist.barrier()
            start = time.perf_counter()
            blocks = stage.run(feed)
            if rank == layout.output_rank:
                report = write_stream(cfg, prep, blocks)
            else:
                for _ in blocks:
                    pass
        else:
            dist.barrier()
            start = time.perf_counter()
            report = write_stream(cfg, prep, tpp.receive_blocks(channel, layout.steps - 1))
        channel.flush()
        stats.compute_s = time.perf_counter() - start - stats.wait_s - stats.send_s
        tpp.publish_stats(stats)
        if rank == layout.output_rank:
            all_stats = tpp.collect_stats(world)
            print(tpp.stats_table(all_stats))
            report.ranks = [{**r.__dict__, "wait_share": r.wait_share} for r in all_stats]
        dist.barrier()
    except BaseException as err:
        if watchdog.peer_error is not None:
            raise tpp.PeerFailure(watchdog.peer_error) from err
        watchdog.report(err)
        raise
    finally:
        watchdog.stop()
    dist.destroy_process_group()
    return report
