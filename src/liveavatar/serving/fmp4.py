"""Fragmented MP4 for Media Source Extensions: H.264 baseline video + AAC audio, one fragment per block, handed
out as bytes the moment the block is encoded.

PyAV encodes (libx264 baseline, ``tune=zerolatency``: no B-frames, no look-ahead, a packet per frame at once; AAC)
and writes the init segment (``ftyp`` + an empty ``moov`` with ``mvex``: ``movflags=empty_moov+default_base_moof``).
The fragments (``moof`` + ``mdat``) are written here: FFmpeg's own fragmenter learns a sample's duration from the
packet after it, so it holds each block's last frame until the next block (or, cut early, gets the decode times
wrong); here every sample's duration is known, and a block's fragment is complete when the block is.

Audio is encoded at 48 kHz (an AAC frame is 1024 samples: 21 ms there, 64 ms at 16 kHz), resampled from the
engine's 16 kHz; the AAC encoder's priming frame (negative time) is dropped so that audio time 0 is video time 0.
"""
from __future__ import annotations

import struct
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.frame import PictureType

from .. import media

# What the page asks MediaSource for: H.264 Constrained Baseline + AAC-LC (both play in Chromium).
MIME = 'video/mp4; codecs="avc1.42c01f, mp4a.40.2"'
AUDIO_RATE = 48000
_VIDEO_TRACK, _AUDIO_TRACK = 1, 2  # FFmpeg's mov muxer numbers tracks by stream index, from 1
# trun sample flags (ISO 14496-12 8.8.3.1): a sync sample depends on no other; others depend on one and are not sync.
_SYNC, _NON_SYNC = 0x02000000, 0x01010000


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def annexb_to_avcc(data: bytes) -> bytes:
    """H.264 NAL units with start codes (``00 00 01`` / ``00 00 00 01``, what libx264 emits) -> each NAL unit
    prefixed by its 4-byte length (what MP4 samples hold)."""
    out, i, n = [], 0, len(data)
    starts = []
    while True:
        j = data.find(b"\x00\x00\x01", i)
        if j < 0:
            break
        starts.append(j + 3)
        i = j + 3
    for k, start in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        nal = data[start:end].rstrip(b"\x00") if k + 1 < len(starts) else data[start:end]
        out.append(struct.pack(">I", len(nal)) + nal)
    return b"".join(out)


def upscale_factor(height: int, width: int, min_side: int) -> int:
    """The whole-number (nearest-neighbour) scale that brings the shorter side to at least ``min_side``."""
    return max(1, -(-int(min_side) // max(1, min(height, width))))


class _Sink:
    """A write-only file for PyAV's muxer: keeps what it is given (the init segment) until :meth:`take`."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class FragmentWriter:
    """Encode blocks of frames and their audio into fragmented MP4 bytes.

    Args:
        height, width: of the frames given to :meth:`write` (before scaling).
        fps: video frame rate.
        sample_rate: of the audio given to :meth:`write` (mono float32).
        scale: nearest-neighbour upscaling (the toy model's 32x32 is too small to watch). H.264 needs even sizes,
            so an odd scaled size is padded by one edge row/column.
        crf, preset, gop_s: x264 quality and speed (``ultrafast``: the encoder shares the CPU with the model), and
            seconds between keyframes (a player joins or seeks at a keyframe).

    ``init`` is the init segment (send it first); ``write(frames, audio)`` returns one fragment, the block's
    frames and the audio the encoder has finished so far (AAC lags its input by up to two 21 ms frames).
    ``keyframe`` says whether the last fragment's first video sample is a keyframe (a decoder can start there:
    the fragments before it may be left out); ``write(..., keyframe=True)`` makes it one.
    """

    def __init__(self, height: int, width: int, fps: float, sample_rate: int = media.SAMPLE_RATE, *, scale: int = 1,
                 crf: int = 23, preset: str = "ultrafast", gop_s: float = 2.0, audio_bitrate: int = 64000):
        self.scale = int(scale)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.sample_rate = int(sample_rate)
        self.size = (int(height) * self.scale, int(width) * self.scale)
        sink = _Sink()
        self._container = av.open(sink, mode="w", format="mp4",
                                  options={"movflags": "empty_moov+default_base_moof+frag_every_frame"})
        v = self._container.add_stream("libx264", rate=self.fps)
        v.height, v.width = (s + s % 2 for s in self.size)
        v.pix_fmt = "yuv420p"
        v.codec_context.time_base = 1 / self.fps
        v.options = {"profile": "baseline", "tune": "zerolatency", "preset": preset, "crf": str(crf),
                     "g": str(max(1, round(gop_s * float(self.fps))))}
        a = self._container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        a.bit_rate = audio_bitrate
        self._container.start_encoding()  # opens the encoders and writes ftyp + moov
        self.init = sink.take()
        self._video, self._audio = v, a
        # The track time scales the muxer chose (written into the moov's mdhd boxes).
        self._video_scale = v.time_base.denominator / v.time_base.numerator
        self._frame_ticks = round(self._video_scale / self.fps)
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
        self._sequence = 0
        self._closed = False
        self._audio_time = 0  # decode time of the next audio sample written (48 kHz ticks)
        self.frames = 0       # video frames written
        self.samples = 0      # audio samples given (at sample_rate)
        self.keyframe = False  # the last fragment starts with a keyframe

    @property
    def seconds(self) -> float:
        """Video written so far."""
        return self.frames / float(self.fps)

    def write(self, frames: torch.Tensor, audio: np.ndarray, keyframe: bool = False) -> bytes:
        """Encode one block: ``frames`` ``[T, 3, H, W]`` float in [-1, 1] (or uint8), ``audio`` ``[samples]`` float32
        at ``sample_rate`` (normally the block's own ``T / fps`` seconds). Returns one ``moof`` + ``mdat``.
        ``keyframe``: the block's first frame becomes an IDR frame (closed GOP: nothing after it refers to what
        came before), so that a client can go on from this fragment after fragments were dropped."""
        u8 = frames if frames.dtype == torch.uint8 else media.to_uint8(frames)
        if self.scale > 1:
            u8 = u8.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        hwc = u8.permute(0, 2, 3, 1).cpu().numpy()
        h, w = self.size
        if h % 2 or w % 2:
            hwc = np.pad(hwc, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        video = []
        for img in hwc:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = self.frames, 1 / self.fps
            if keyframe and not video:
                frame.pict_type = PictureType.I  # libx264 makes a forced I frame an IDR (closed GOP)
            video += self._video.encode(frame)
            self.frames += 1
        self.keyframe = bool(video) and video[0].is_keyframe
        return self._fragment(video, self._encode_audio(np.asarray(audio, dtype=np.float32)))

    def close(self) -> bytes:
        """Flush both encoders and free them: the last fragment (possibly empty bytes). Safe to call twice."""
        if self._closed:
            return b""
        self._closed = True
        audio = [p for f in self._resampler.resample(None) for p in self._audio.encode(f)] + self._audio.encode(None)
        tail = self._fragment(self._video.encode(None), [p for p in audio if p.pts is None or p.pts >= 0])
        self._container.close()  # the trailer it writes to the sink is not part of the stream
        return tail

    def _encode_audio(self, audio: np.ndarray) -> list:
        if audio.size == 0:
            return []
        frame = av.AudioFrame.from_ndarray(np.clip(audio, -1, 1)[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, self.samples, Fraction(1, self.sample_rate)
        self.samples += audio.size
        packets = [p for f in self._resampler.resample(frame) for p in self._audio.encode(f)]
        return [p for p in packets if p.pts is None or p.pts >= 0]  # the priming frame would start before 0

    def _fragment(self, video: list, audio: list) -> bytes:
        """One ``moof`` (a ``traf`` per track that has samples) + ``mdat`` holding the samples."""
        tracks = []
        if video:
            samples = [annexb_to_avcc(bytes(p)) for p in video]
            flags = [_SYNC if p.is_keyframe else _NON_SYNC for p in video]
            start = (self.frames - len(video)) * self._frame_ticks
            tracks.append((_VIDEO_TRACK, start, samples, [self._frame_ticks] * len(samples), flags))
        if audio:
            samples = [bytes(p) for p in audio]
            durations = [int(p.duration or 1024) for p in audio]
            tracks.append((_AUDIO_TRACK, self._audio_time, samples, durations, [_SYNC] * len(samples)))
            self._audio_time += sum(durations)
        if not tracks:
            return b""
        self._sequence += 1

        def moof(offsets: list[int]) -> bytes:
            trafs = []
            for (track, start, samples, durations, flags), offset in zip(tracks, offsets):
                entries = b"".join(struct.pack(">III", d, len(s), f) for s, d, f in zip(samples, durations, flags))
                trafs.append(_box(b"traf",
                                  _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track)),  # default-base-is-moof
                                  _full_box(b"tfdt", 1, 0, struct.pack(">Q", start)),
                                  # data offset + per-sample duration, size and flags
                                  _full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(samples), offset), entries)))
            return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence)), *trafs)

        # Sample data offsets count from the moof's first byte; the moof's size does not depend on their values.
        size = len(moof([0] * len(tracks)))
        offsets, at = [], size + 8
        for _, _, samples, _, _ in tracks:
            offsets.append(at)
            at += sum(len(s) for s in samples)
        return moof(offsets) + _box(b"mdat", *(s for t in tracks for s in t[2]))
