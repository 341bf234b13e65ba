"""``TPPPipeline``: a Timestep-forcing Pipeline Parallel group (launched by torchrun, see
:mod:`liveavatar.engine.tpp`) that serves one request after another, as :class:`~liveavatar.pipeline.LiveAvatarPipeline`
does in one process. Each DiT rank loads its model once; every rank takes every request, with the same arguments,
and does its part; the output rank (the decoding rank, or the last step's with ``engine.decode_on_last``) gets the
decoded blocks. ``infer.py engine=tpp`` is one request; GenBench streams its cases through it; ``serve.py
engine=tpp`` runs live sessions through :meth:`TPPPipeline.stream_live` (see :mod:`liveavatar.serving.tpp_group`).

Between requests the group meets at a barrier, so a request starts on every rank at once (its time to first frame
counts from there) and the output rank may take its time with a finished video (writing, scoring) while the
others wait. A failure on any rank stops every rank (the watchdog), with the failing rank named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from .components import Components, UserError, frames_in, resolve_dtype
from .engine import tpp
from .engine.stream import StreamCore
from .pipeline import (AudioFeatureOptions, AvatarStream, StreamBlock, decode_blocks, dit_config, engine_settings,
                       feature_blocks, load_model, prompt_context, read_image, read_waveform, speaking_mask,
                       still_motion_latents)
from .models.audio import blocks_for


class TPPPipeline:
    """This rank's part of a TPP group. Build it on every rank of the torchrun job with the same ``cfg``
    (``conf/infer.yaml``); :meth:`close` when done."""

    def __init__(self, cfg: DictConfig):
        if "RANK" not in os.environ:
            raise UserError("engine=tpp runs under torchrun: torchrun --nproc_per_node=N+1 infer.py engine=tpp ...")
        e = cfg.engine
        self.layout = tpp.Layout(len(cfg.denoise.steps), bool(e.decode_on_last))
        self.rank, world, self.device = tpp.init_process_group(float(e.timeout_s))
        self.watchdog = tpp.Watchdog(tpp.default_store(), self.rank, float(e.fault_poll_s))
        role = f"step {self.rank}" if self.layout.is_dit(self.rank) else "decode"
        if self.rank == self.layout.output_rank and self.layout.decode_on_last:
            role += "+decode"
        self.stats = tpp.RankStats(self.rank, role)
        self.channel = tpp.Channel(self.device, self.stats)
        self.stage_options = tpp.StageOptions(float(e.heartbeat_s), e.simulate_forward_ms)
        with self.guard():
            if world != self.layout.world_size:
                raise UserError(f"engine=tpp with {self.layout.steps} steps needs {self.layout.world_size} ranks "
                                f"({self.layout.steps} DiT ranks"
                                f"{'' if self.layout.decode_on_last else ' + 1 decoding rank'}); "
                                f"torchrun started {world}")
            if self.device.type == "cpu":
                torch.set_num_threads(int(e.threads_per_rank))
            try:
                self.settings = engine_settings(cfg)
            except ValueError as err:
                raise UserError(str(err)) from err
            self.dit = dit_config(cfg)
            self.dtype = resolve_dtype(cfg.dtype)
            self.model = load_model(cfg, self.dit, self.device, self.dtype) if self.layout.is_dit(self.rank) else None
            self.components = Components(cfg.model, self.device)
            self.components.check(self.dit)
            self.audio_options = AudioFeatureOptions.from_config(cfg)
            self.seed = int(cfg.seed)
            # A path of precomputed embeddings (a Path, not text to encode), as LiveAvatarPipeline takes it.
            self.prompt = Path(cfg.prompt_embedding) if cfg.get("prompt_embedding") else str(cfg.prompt)
            self.audio_encoder = self.components.audio_encoder if self.dit.has_audio and self.rank == 0 else None
        self._started: tuple[float, float, float] | None = None   # (time, wait_s, send_s) when a request began
        self._context: torch.Tensor | None = None                 # the prompt's, for live sessions

    @property
    def is_output(self) -> bool:
        return self.rank == self.layout.output_rank

    @property
    def fps(self) -> float:
        return self.components.fps

    @contextlib.contextmanager
    def guard(self):
        """Publish this rank's failure to the others and raise it as :class:`~liveavatar.engine.tpp.RankFailure`, or
        turn a peer's into :class:`~liveavatar.engine.tpp.PeerFailure`."""
        try:
            yield
        except BaseException as err:
            if self.watchdog.peer_error is not None:
                raise tpp.PeerFailure(self.watchdog.peer_error) from err
            if isinstance(err, (UserError, tpp.GroupFailure)):  # a user error is raised alike on every rank
                raise
            self.watchdog.report(err)
            if isinstance(err, Exception):  # not GeneratorExit or KeyboardInterrupt: those keep their meaning
                raise tpp.RankFailure(tpp.describe_failure(self.rank, err)) from err
            raise

    @torch.no_grad()
    def stream(self, image: str | os.PathLike | torch.Tensor, audio: Any, prompt: Any = None, *,
               seed: int | None = None, max_seconds: float | None = None, listen_audio: Any = None,
               audio_mask: str | os.PathLike | np.ndarray | None = None) -> AvatarStream | None:
        """Start one request on this rank (a collective: every rank calls it with the same arguments).

        Inputs as :meth:`LiveAvatarPipeline.stream` takes them (a whole waveform or a file; live chunks are for
        ``infer.py``'s single run, where rank 0 reads them). The inputs are read and encoded on every rank before
        the group meets, so a bad input is the same :class:`UserError` on every rank and the group stays in step.
        Returns the decoded blocks on the output rank (consume them all: the last one meets the group again), and
        None on the other ranks once their part is done.
        """
        with self.guard():
            pixels = read_image(image, self.components.resolution)
            wav = read_waveform(audio, max_seconds)
            video_frames = frames_in(len(wav), self.fps)
            if video_frames < 1:
                raise UserError("audio: shorter than one video frame")
            listen = None if listen_audio is None else read_waveform(listen_audio, max_seconds)
            speaking = speaking_mask(self.dit, wav, listen, audio_mask, video_frames, self.fps)
            reference, motion = self._reference_latents(pixels)
            context = prompt_context(self.prompt if prompt is None else prompt, self.components, self.dit, self.device)
            total = blocks_for(video_frames, self.dit.frames_per_block, self.dit.video_frames_per_latent)
            stage = None
            if self.layout.is_dit(self.rank):
                stage = self._stage(reference, motion, context, seed, self.stage_options)
            feed = None
            if self.rank == 0:
                feed = tpp.AudioFeed(feature_blocks(self.audio_encoder, wav, video_frames, self.fps, self.dit,
                                                    self.audio_options, listen, speaking))
            x0s = self._start(stage, feed)
            if x0s is None:
                return None
            blocks = self._guarded(decode_blocks(self.components.vae, x0s, video_frames))
            return AvatarStream(blocks, self.fps, np.asarray(wav, dtype=np.float32), total, video_frames)

    def _stage(self, reference: torch.Tensor, motion: torch.Tensor | None, context: torch.Tensor, seed: int | None,
               options: tpp.StageOptions) -> tpp.DiTStage:
        """This DiT rank's stage of one stream, from a fresh core (its own step's KV cache, one lane)."""
        try:
            core = StreamCore(self.model, self.settings, (reference.shape[1], reference.shape[3], reference.shape[4]),
                              context, reference, seed=self.seed if seed is None else int(seed), lanes=1,
                              sink_motion=None if motion is None else motion.to(self.dtype))
            return tpp.DiTStage(core, self.rank, self.layout, self.channel, options)
        except ValueError as err:
            raise UserError(str(err)) from err

    def _reference_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference image ``[3, H, W]`` as latents ``[1, C, 1, h, w]`` and, for a model that takes them, the
        still motion latents."""
        image = pixels[None, :, None].to(self.device)
        reference = self.components.vae.encode(image).to(self.dtype)
        return reference, still_motion_latents(self.components.vae, image, self.dit, self.settings)

    def _live_stage(self, pixels: torch.Tensor, seed: int | None, options: tpp.StageOptions) -> tpp.DiTStage:
        reference, motion = self._reference_latents(pixels)
        return self._stage(reference, motion, self._context, seed, options)

    def _start(self, stage: tpp.DiTStage | None, feed: tpp.AudioFeed | None) -> Iterator | None:
        """Meet the group and run this rank's part of one request. Returns the clean latents ``(block, x0)`` that
        the output rank decodes; None on a DiT rank that is not the output rank, once its part is done."""
        dist.barrier()
        self._started = (time.perf_counter(), self.stats.wait_s, self.stats.send_s)
        if stage is None:
            return tpp.receive_blocks(self.channel, self.layout.steps - 1)
        x0s = stage.run(feed)
        if self.is_output:
            return x0s
        for _ in x0s:
            pass
        self._end()
        return None

    @torch.no_grad()
    def prepare_live(self) -> None:
        """Ready this rank for :meth:`stream_live`: the prompt's context, once; on a DiT rank a stage is built and
        dropped, so that settings TPP cannot stream are refused now (the same :class:`UserError` on every DiT
        rank), not at the first session."""
        with self.guard():
            self._context = prompt_context(self.prompt, self.components, self.dit, self.device)
            if self.layout.is_dit(self.rank):
                self._live_stage(torch.zeros(3, *self.components.resolution), None, self.stage_options)

    @torch.no_grad()
    def stream_live(self, image: torch.Tensor, features: Iterable | None, *, skip: Callable[[], bool] | None = None,
                    seed: int | None = None) -> Iterator[tuple[StreamBlock, float]] | None:
        """One live session on this rank (a collective: every rank calls it, after :meth:`prepare_live`), from a
        fresh cache.

        Args:
            image: the reference ``[3, H, W]`` in [-1, 1].
            features: rank 0's per-block audio features (any iterable; it may block between blocks, heartbeats
                keep the group alive meanwhile; the session ends with it); None on the other ranks.
            skip: while it returns True the session is given up: blocks pass every rank without compute and the
                output rank decodes nothing, so the stream ends within about one forward.
            seed: the noise seed (None: ``seed``).

        Returns on the output rank the decoded blocks with their cost, ``(StreamBlock, cost_s)`` (the longest
        compute one stage, decoding included, spent on the block: the pipeline's pace), to be consumed to the end
        (the last one meets the group again); None on the other ranks once their part is done.
        """
        with self.guard():
            pixels = read_image(image, self.components.resolution)
            options = dataclasses.replace(self.stage_options, skip=skip)
            stage = self._live_stage(pixels, seed, options) if self.layout.is_dit(self.rank) else None
            feed = tpp.AudioFeed(features) if self.rank == 0 else None
            x0s = self._start(stage, feed)
            if x0s is None:
                return None
            if stage is not None:
                upstream = lambda: stage.cost_s  # noqa: E731
            else:
                upstream = lambda: self.channel.received_cost_s  # noqa: E731
        return self._guarded(self._decode_live(x0s, upstream, skip))

    def _decode_live(self, x0s: Iterable[tuple[int, torch.Tensor]], upstream: Callable[[], float],
                     skip: Callable[[], bool] | None) -> Iterator[tuple[StreamBlock, float]]:
        decoder = self.components.vae.stream_decoder()
        clock = tpp.ComputeClock(self.device)
        for index, x0 in x0s:
            if skip is not None and skip():
                continue  # given up: drained, not decoded
            started = clock.start()
            frames = decoder.decode(x0)[0].transpose(0, 1)  # [T, 3, H, W]
            cost = clock.stop(started)
            yield StreamBlock(index, frames.float().cpu()), max(upstream(), cost)

    def _guarded(self, blocks):
        with self.guard():
            yield from blocks
            self._end()

    def _end(self) -> None:
        """After a request: flush what this rank still sends, account its time, meet the group."""
        self.channel.flush()
        if self._started is not None:
            start, wait, send = self._started
            elapsed = time.perf_counter() - start
            self.stats.compute_s += elapsed - (self.stats.wait_s - wait) - (self.stats.send_s - send)
            self._started = None
        dist.barrier()

    def rank_stats(self) -> list[tpp.RankStats] | None:
        """Every rank's blocks and compute / wait / send seconds so far, on the output rank (a collective)."""
        with self.guard():
            tpp.publish_stats(self.stats)
            dist.barrier()
            return tpp.collect_stats(self.layout.world_size) if self.is_output else None

    def close(self) -> None:
        self.watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
