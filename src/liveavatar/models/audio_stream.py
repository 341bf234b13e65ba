"""Causal, block-by-block audio features for live input.

The offline path (:func:`liveavatar.models.audio.split_into_blocks` over features of the whole file) needs the
whole recording: wav2vec2 normalises the waveform with whole-file statistics, its first conv layer's GroupNorm
normalises over the whole sequence, and its transformer attends to future audio. A microphone has none of that.
:class:`StreamingAudioFeatures` takes audio as it arrives and hands out each block's grouped features as soon as
the audio under the block is present, by running the extractor over a rolling window: a fixed look-back of past
audio plus the block itself, never anything after the block.

Latency: a block's features are ready once the audio up to the end of its last video frame has arrived, i.e. one
block duration after the block starts (``frames_per_block * video_frames_per_latent / fps`` seconds; 0.12 s for
the tiny preset, 0.48 s for Wan's 3 latent frames of 4 video frames, 0.36 s for Wan's first block) plus the time
of one extractor pass over ``lookback_s`` + one block of audio. No look-ahead is added.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from .audio import SAMPLE_RATE, blocks_for, group_by_latent_frame


class StreamingAudioFeatures:
    """Feed 16 kHz mono audio in chunks of any size; get the features of each finished block.

    Args:
        extractor: :class:`~liveavatar.models.audio.Wav2Vec2Features` or
            :class:`~liveavatar.models.audio.EnergyMelFeatures` (anything called as ``extractor(wav, frames)`` ->
            ``[1, frames, layers, feat]``, with per-frame outputs aligned to video frame boundaries).
        fps: video frame rate.
        frames_per_block: latent frames per block (the DiT's ``frames_per_block``).
        video_frames_per_latent: video frames per latent frame (the VAE's time factor).
        lookback_s: seconds of audio before a block's first video frame that the extractor sees with it (rounded
            to whole video frames). 0: each block alone.
        sample_rate: of the pushed audio.
        first_frame_alone: how latent frames pair with video frames. True (Wan2.1's VAE pairing): latent frame 0 is
            video frame 0 alone; False (Wan2.2-S2V, Live Avatar's release): latent frame ``j`` is video frames
            ``per_latent * j`` onwards.

    ``push(samples)`` and ``flush()`` return lists of block features on the extractor's device, in order, exactly
    the layout one element of the offline split has. With ``first_frame_alone``: ``[1, frames_per_block,
    per_latent, layers, feat]`` (:func:`split_into_blocks`); block ``b`` covers video frame 0 alone for ``b = 0``
    (repeated ``per_latent`` times, as in :func:`group_by_latent_frame`) and ``per_latent * frames_per_block``
    frames otherwise. Without: ``[1, per_latent * frames_per_block, layers, feat]``, the block's video frames
    (:func:`split_video_frames`).

    Each block is computed from the extractor run over ``[block start - lookback, block end)``; the waveform is
    normalised with the statistics of that window only (what wav2vec2's feature extractor does per call).
    Audio is kept on the extractor's device; only the last ``lookback + block`` samples are held.
    """

    def __init__(self, extractor, fps: float, frames_per_block: int, video_frames_per_latent: int = 4,
                 lookback_s: float = 2.0, sample_rate: int = SAMPLE_RATE, first_frame_alone: bool = True):
        if frames_per_block < 1 or video_frames_per_latent < 1:
            raise ValueError(f"frames_per_block={frames_per_block}, video_frames_per_latent={video_frames_per_latent}: "
                             "must be >= 1")
        if not lookback_s >= 0:
            raise ValueError(f"lookback_s={lookback_s}: must be >= 0")
        self.extractor = extractor
        self.fps = Fraction(fps).limit_denominator(1001)
        if self.fps <= 0:
            raise ValueError(f"fps={fps}: must be positive")
        self.fpb, self.per_latent = int(frames_per_block), int(video_frames_per_latent)
        self.first_frame_alone = bool(first_frame_alone)
        self.sample_rate = int(sample_rate)
        self.lookback_frames = round(lookback_s * float(self.fps))
        self.device = torch.device(getattr(extractor, "device", "cpu"))
        self.reset()

    def reset(self) -> None:
        """Forget all audio: the next push starts a new stream at time 0."""
        self._buf = torch.zeros(0, device=self.device)  # samples [_buf_start, _received)
        self._buf_start = 0
        self._received = 0
        self._next = 0  # index of the next block to emit
        self._closed = False

    # ------------------------------------------------------------------------------------------ geometry

    def boundary(self, frame: int) -> int:
        """First sample at or after the start of video frame ``frame`` (the end of frame ``frame - 1``)."""
        return -(-frame * self.sample_rate * self.fps.denominator // self.fps.numerator)

    def frames_in(self, samples: int) -> int:
        """Whole video frames that ``samples`` cover (as :func:`liveavatar.components.frames_in` counts them)."""
        return samples * self.fps.numerator // (self.sample_rate * self.fps.denominator)

    def block_frames(self, block: int) -> tuple[int, int]:
        """Video frames ``[first, end)`` of ``block`` (before padding)."""
        p, f = self.per_latent, self.fpb
        if not self.first_frame_alone:
            return p * f * block, p * f * (block + 1)
        first = 0 if block == 0 else p * (block * f - 1) + 1
        return first, p * ((block + 1) * f - 1) + 1

    @property
    def block_seconds(self) -> float:
        """Duration of a full block (after the first): the minimum latency of its features."""
        return self.per_latent * self.fpb / float(self.fps)

    @property
    def received(self) -> int:
        """Samples pushed so far."""
        return self._received

    @property
    def blocks_emitted(self) -> int:
        return self._next

    # ------------------------------------------------------------------------------------------ streaming

    @torch.no_grad()
    def push(self, samples: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Append ``samples`` ``[n]`` (float, mono, any ``n``); return the blocks whose audio is now complete."""
        if self._closed:
            raise RuntimeError("StreamingAudioFeatures: push() after flush(); call reset() to start a new stream")
        chunk = samples if isinstance(samples, torch.Tensor) else torch.from_numpy(np.asarray(samples, np.float32))
        chunk = chunk.detach().reshape(-1).to(self.device, torch.float32, non_blocking=True)
        if chunk.numel() == 0:
            return []
        self._buf = torch.cat([self._buf, chunk])
        self._received += chunk.numel()
        out = []
        while self.boundary(self.block_frames(self._next)[1]) <= self._received:
            out.append(self._block(self._next, self.block_frames(self._next)[1]))
            self._next += 1
        self._trim()
        return out

    @torch.no_grad()
    def flush(self) -> list[torch.Tensor]:
        """The audio has ended: return the remaining blocks, the last one padded with its final video frame (as
        the offline split pads), so that all blocks together number ``blocks_for(frames_in(received))``."""
        self._closed = True
        frames = self.frames_in(self._received)
        out = []
        for block in range(self._next, blocks_for(frames, self.fpb, self.per_latent)):
            out.append(self._block(block, frames))
        self._next += len(out)
        return out

    def _window_start(self, block: int) -> int:
        return max(0, self.block_frames(block)[0] - self.lookback_frames)

    def _trim(self) -> None:
        keep_from = self.boundary(self._window_start(self._next))
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :]
            self._buf_start = keep_from

    def _block(self, block: int, end: int) -> torch.Tensor:
        """Features of ``block``'s video frames below ``end`` (padded to the full block), in the class's layout."""
        first, full_end = self.block_frames(block)
        start = self._window_start(block)
        a, b = self.boundary(start) - self._buf_start, self.boundary(end) - self._buf_start
        feats = self.extractor(self._buf[a:b], end - start)[:, first - start :]  # [1, end - first, layers, feat]
        if block == 0 and self.first_frame_alone:  # video frame 0 forms latent frame 0 alone
            return group_by_latent_frame(feats, self.fpb, self.per_latent)
        missing = full_end - end
        if missing:
            feats = torch.cat([feats, feats[:, -1:].expand(-1, missing, *feats.shape[2:])], dim=1)
        if not self.first_frame_alone:
            return feats
        return feats.reshape(1, self.fpb, self.per_latent, *feats.shape[2:])


def stream_blocks(extractor, wav: np.ndarray | torch.Tensor, fps: float, frames_per_block: int,
                  video_frames_per_latent: int, lookback_s: float, chunk_samples: int | None = None,
                  first_frame_alone: bool = True) -> list[torch.Tensor]:
    """Feed ``wav`` ``[samples]`` through :class:`StreamingAudioFeatures` in chunks of ``chunk_samples`` (default:
    one block's duration), as a live input would arrive, and return every block's features."""
    stream = StreamingAudioFeatures(extractor, fps, frames_per_block, video_frames_per_latent, lookback_s,
                                    first_frame_alone=first_frame_alone)
    if chunk_samples is None:
        chunk_samples = max(1, math.ceil(stream.block_seconds * stream.sample_rate))
    blocks = []
    for i in range(0, len(wav), chunk_samples):
        blocks += stream.push(wav[i : i + chunk_samples])
    return blocks + stream.flush()
