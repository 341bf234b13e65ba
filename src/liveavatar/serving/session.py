"""One client's live stream: its audio in (:class:`~.live_audio.LiveAudio`), the pipeline's blocks out as MP4
fragments (:class:`~.fmp4.FragmentWriter`) and figures, run on the model's thread.

Messages to the client go through ``emit``: ``bytes`` (the init segment), one :class:`~.outgoing.Fragment` per
block (its MP4 fragment and its JSON ``{"type": "block", ...}``: its place in the video, the client sample its first
frame's audio ends at, the figures), and dicts (JSON): at the end ``{"type": "ended", "reason": ...}`` or
``{"type": "error", "message": ...}``.

The pipeline is one process (:class:`~liveavatar.pipeline.LiveAvatarPipeline`, which asks for each block's audio
when it needs it) or a TPP group (:class:`~.tpp_group.TPPGroup`, whose feeder takes the audio as it comes and which
reports each block's cost: the slowest stage's compute, the pipeline's throughput limit).
"""
from __future__ import annotations

import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..components import SAMPLE_RATE, UserError
from ..models.audio_stream import StreamingAudioFeatures
from ..pipeline import LiveAvatarPipeline
from .fmp4 import MIME, FragmentWriter, upscale_factor
from .live_audio import AudioBlock, LiveAudio, SessionCancelled
from .outgoing import Fragment


@dataclass(frozen=True)
class SessionOptions:
    """``server.*`` settings of every session: ``max_lag_s`` and ``grace_s`` (:class:`LiveAudio`), ``max_seconds``
    (video per session, None: no limit), ``min_side`` (frames are upscaled, nearest, until the shorter side is at
    least this), ``crf`` (x264 quality), ``recent_blocks`` (the window of the recent real-time factor)."""

    max_lag_s: float = 0.5
    grace_s: float = 0.25
    max_seconds: float | None = None
    min_side: int = 256
    crf: int = 23
    recent_blocks: int = 20


class BlockClock:
    """The audio samples of each block, as the pipeline's causal features cut them (the geometry of
    :class:`~liveavatar.models.audio_stream.StreamingAudioFeatures` for this model): feeding exactly these chunks
    makes every chunk finish exactly one block."""

    def __init__(self, pipe: LiveAvatarPipeline):
        dit = pipe.dit
        # Only its geometry is used: no extractor, no look-back.
        self._geometry = StreamingAudioFeatures(None, pipe.fps, dit.frames_per_block, dit.video_frames_per_latent,
                                                0.0, SAMPLE_RATE, first_frame_alone=dit.family != "s2v")

    def frames(self, block: int) -> tuple[int, int]:
        """Video frames ``[first, end)`` of ``block``."""
        return self._geometry.block_frames(block)

    def samples(self, block: int) -> int:
        """Audio samples under ``block``'s frames."""
        first, end = self.frames(block)
        return self._geometry.boundary(end) - self._geometry.boundary(first)

    def first_frame_samples(self, block: int) -> int:
        """Audio samples under the first frame of ``block``."""
        first = self.frames(block)[0]
        return self._geometry.boundary(first + 1) - self._geometry.boundary(first)


class Session:
    """One client's stream through ``pipe``.

    Args:
        pipe: the loaded pipeline (``sequential`` or ``stream_batch``) or a :class:`~.tpp_group.TPPGroup`.
        image: the reference ``[3, H, W]`` float in [-1, 1] (any size: the pipeline resizes it).
        options: :class:`SessionOptions`.
        emit: called (on the model's thread) with each message for the client: ``bytes`` or a dict.
        waiting: how many sessions wait behind this one (shown with the figures).
        streams: the pipeline's stream (and with it the KV cache) is added here while it lives (the server's
            status counts them: a session that ended must leave none behind).

    The socket's reader feeds :attr:`audio` and calls :meth:`cancel`; the model's thread calls :meth:`run`.
    """

    def __init__(self, pipe: LiveAvatarPipeline, image: torch.Tensor, options: SessionOptions,
                 emit: Callable[[Any], None], waiting: Callable[[], int] = lambda: 0,
                 streams: weakref.WeakSet | None = None):
        self.pipe, self.image, self.options, self.emit, self.waiting = pipe, image, options, emit, waiting
        self.streams = streams
        self.audio = LiveAudio(SAMPLE_RATE, options.max_lag_s, options.grace_s)
        self.clock = BlockClock(pipe)
        self.stream_ref: weakref.ref | None = None  # the pipeline's stream (KV cache and all) while it lives
        self._fed: deque[AudioBlock] = deque()       # blocks of audio fed and not yet out as video
        self._waited = 0.0                           # seconds the model's thread spent waiting for audio
        self._keyframe = False                       # the next block starts with a keyframe (fragments were dropped)
        self.figures: dict[str, Any] = {}

    def cancel(self) -> None:
        """Stop as soon as the engine next asks for audio (at the latest one block's compute from now)."""
        self.audio.cancel()

    def request_keyframe(self) -> None:
        """Start the next block's fragment with a keyframe (the client's connection dropped fragments); any
        thread."""
        self._keyframe = True

    def started_message(self) -> dict:
        """What the page needs to play the stream: the MIME type for MediaSource, the video's rate and size, and
        the frames of a (steady-state) block, which sets the player's jitter lead."""
        h, w = self.pipe.components.resolution
        scale = upscale_factor(h, w, self.options.min_side)
        first, end = self.clock.frames(1)
        return {"type": "started", "mime": MIME, "fps": self.pipe.fps, "sample_rate": SAMPLE_RATE,
                "width": w * scale, "height": h * scale, "block_frames": end - first, "engine": self.pipe.engine}

    def _chunks(self) -> Iterator[np.ndarray]:
        """The client's audio, one block's exact samples at a time, until the session's video limit."""
        limit = self.options.max_seconds
        block = 0
        while limit is None or self.clock.frames(block)[0] < limit * self.pipe.fps:
            start = time.perf_counter()
            taken = self.audio.take(self.clock.samples(block))
            self._waited += time.perf_counter() - start
            self._fed.append(taken)
            block += 1
            yield taken.samples

    def run(self) -> str:
        """Stream until the client leaves or stops (``cancelled``), the video limit (``limit``), or a failure
        (``error``, after an error message). Frees the stream's cache before returning the reason."""
        try:
            return self._run()
        finally:
            self._fed.clear()

    def _run(self) -> str:
        start = time.perf_counter()
        h, w = self.pipe.components.resolution
        fps = self.pipe.fps
        try:
            stream = self.pipe.stream(self.image, self._chunks())
        except UserError as err:
            self.emit({"type": "error", "message": str(err)})
            return "error"
        self.stream_ref = weakref.ref(stream)
        if self.streams is not None:
            self.streams.add(stream)
        writer = FragmentWriter(h, w, fps, SAMPLE_RATE, scale=upscale_factor(h, w, self.options.min_side),
                                crf=self.options.crf)
        self.emit(writer.init)
        busy, video_s, recent = 0.0, 0.0, deque(maxlen=self.options.recent_blocks)
        try:
            while True:
                t0, waited0 = time.perf_counter(), self._waited
                try:
                    index, frames = next(stream)
                except StopIteration:
                    self.emit(writer.close())
                    return "limit"
                fed = self._fed.popleft()
                media_start = writer.seconds
                keyframe, self._keyframe = self._keyframe, False
                t_write = time.perf_counter()
                data = writer.write(frames, fed.samples, keyframe=keyframe)
                done = time.perf_counter()
                cost = getattr(stream, "block_cost_s", None)  # a TPP group's slowest stage on this block
                if cost is None:
                    block_busy = done - t0 - (self._waited - waited0)  # model + decode + encode
                else:  # the pipeline's stages and this encoder run at once: the slowest one sets the pace
                    block_busy = max(cost, done - t_write)
                block_s = frames.shape[0] / fps
                busy, video_s = busy + block_busy, video_s + block_s
                recent.append((block_busy, block_s))
                if index == 0:
                    self.figures["first_frame_s"] = time.perf_counter() - start
                self.figures.update(self._figures(busy, video_s, recent))
                self.emit(Fragment(data, int(frames.shape[0]), block_s, writer.keyframe, {
                    "type": "block", "index": index, "frames": int(frames.shape[0]), "media_start": media_start,
                    # the client sample at which the audio of this block's first frame ends (None: silence)
                    "audio_sample": None if fed.client_start is None
                    else fed.client_start + self.clock.first_frame_samples(index),
                    **self.figures}))
        except SessionCancelled:
            return "cancelled"
        except UserError as err:
            self.emit({"type": "error", "message": str(err)})
            return "error"
        except Exception as err:  # noqa: BLE001 - one line to the client, the traceback to the server's console
            traceback.print_exc()
            self.emit({"type": "error", "message": f"the server failed: {type(err).__name__}: {err}"})
            return "error"
        finally:
            writer.close()
            close = getattr(stream, "close", None)  # a TPP group's ranks are freed (and told so) here
            if close is not None:
                close()

    def _figures(self, busy: float, video_s: float, recent: deque) -> dict:
        fps = self.pipe.fps
        recent_busy, recent_video = (sum(v) for v in zip(*recent))
        return {"first_frame_s": self.figures.get("first_frame_s"),
                "rtf": busy / video_s, "rtf_recent": recent_busy / recent_video, "video_s": video_s,
                "dropped_blocks": self.audio.dropped_blocks,
                "dropped_frames": round(self.audio.dropped_samples * fps / SAMPLE_RATE),
                "silent_blocks": self.audio.silent_blocks, "backlog_s": self.audio.backlog_s,
                "waiting": self.waiting()}
