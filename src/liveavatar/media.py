"""Image, audio and video I/O with PyAV (FFmpeg; video frames optionally with decord), no torchvision/torchaudio.

Conventions used everywhere in the package:

* images: float32 ``[3, H, W]`` in ``[-1, 1]``, RGB;
* video frames: float32 ``[T, 3, H, W]`` in ``[-1, 1]``, RGB (one image per time step, so blocks of frames
  from a streaming generator concatenate along dim 0);
* audio: float32 numpy ``[samples]``, mono, in ``[-1, 1]``, at 16 kHz unless told otherwise.

Everything that can fail because of a user's file raises :class:`MediaError` with one line naming the file;
command-line entry points print that line and exit with status 2. Files are written atomically: to a hidden
``.name.partial.ext`` next to the target, then ``os.replace`` d over it, so a crash never leaves half a file
under the final name.
"""
from __future__ import annotations

import contextlib
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Protocol

import av
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MediaError",
    "AudioChunks",
    "READERS",
    "VideoReader",
    "VideoWriter",
    "probe",
    "read_audio",
    "read_image",
    "get_reader",
    "iter_video_frames",
    "read_video",
    "resize_crop",
    "to_uint8",
    "write_image",
    "write_wav",
]

# The package's two rates, defined here and nowhere else: audio is handled at 16 kHz (what wav2vec2 was trained
# on), and videos run at 25 fps unless a preset (``model.fps``) or a file says otherwise.
SAMPLE_RATE = 16000
VIDEO_FPS = 25

# AVColorSpace codes that swscale has coefficients for; 6 (SMPTE 170M) is the same matrix as 5 (BT.601).
_SWS_COLORSPACES = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


class MediaError(ValueError):
    """A media file is missing, unreadable, empty or lacks the stream asked for. The message is one line."""


# ----------------------------------------------------------------------------------------------- helpers


def _check_file(path: str | os.PathLike, what: str) -> Path:
    """Fail early with a clear message: FFmpeg's own errors for a missing file or a folder are cryptic."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{what} file not found: {p}")
    if not p.is_file():
        raise MediaError(f"{what} path is not a file: {p}")
    if p.stat().st_size == 0:
        raise MediaError(f"{what} file is empty (0 bytes): {p}")
    return p


def _ffmpeg_reason(err: BaseException) -> str:
    # av errors carry a long "[Errno ...] ...: 'path'" string; keep only the reason.
    text = getattr(err, "strerror", None) or str(err)
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _open_input(p: Path, what: str) -> Iterator[av.container.InputContainer]:
    """``av.open`` for reading, with every FFmpeg failure (open, demux, decode) turned into MediaError."""
    try:
        container = av.open(str(p), "r")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise MediaError(f"cannot open {what} file {p}: {_ffmpeg_reason(err)}") from None
    if container.format.name == "tty":  # FFmpeg would happily render a .txt file as ANSI art
        container.close()
        raise MediaError(f"{what} file {p} is a text file, not a media file")
    try:
        yield container
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(f"cannot decode {what} file {p}: {_ffmpeg_reason(err)}") from None
    finally:
        container.close()


def _partial_path(path: Path) -> Path:
    """Hidden temporary name next to ``path`` that keeps its extension (FFmpeg picks the muxer from it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _frame_to_rgb(frame: av.VideoFrame, fmt: str = "rgb24") -> np.ndarray:
    """Decoded frame -> uint8 ``[H, W, C]``, honouring its YUV matrix/range and display rotation.

    The YUV matrix and range are passed to swscale explicitly from the frame's tags (untagged: BT.601 and
    limited range, or full range for ``yuvj``), rather than relying on PyAV's defaults, whose documented
    source range is "unspecified". Rotation comes from EXIF (JPEG) or the display matrix (phone videos);
    mirroring is not applied.
    """
    if frame.format.is_rgb or frame.format.has_palette or frame.format.name.startswith(("gray", "ya")):
        arr = frame.to_ndarray(format=fmt)
    else:
        rng = frame.color_range if frame.color_range in (1, 2) else (2 if frame.format.name.startswith("yuvj") else 1)
        cs = _SWS_COLORSPACES.get(frame.colorspace, 5)
        arr = frame.reformat(format=fmt, src_colorspace=cs, src_color_range=rng, dst_color_range=2).to_ndarray()
    rotation = getattr(frame, "rotation", 0) or 0  # counter-clockwise degrees
    if rotation % 90 == 0 and rotation % 360:
        arr = np.ascontiguousarray(np.rot90(arr, k=int(rotation // 90) % 4))
    return arr


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Quantise ``[-1, 1]`` floats to uint8 exactly as :class:`VideoWriter` does: ``round((x + 1) * 127.5)``."""
    return frames.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------ images


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a PNG/JPEG (anything FFmpeg decodes; for a video, its first frame) -> float32 ``[3, H, W]`` in [-1, 1].

    ``size=(H, W)``: center-crop to that aspect ratio, then resize (bicubic, antialiased), so faces are not
    stretched. EXIF rotation of phone photos is applied (mirroring is not). Transparent pixels
    are composited over white, since the model expects an opaque RGB picture.
    """
    p = _check_file(path, "image")
    with _open_input(p, "image") as container:
        if not container.streams.video:
            raise MediaError(f"image file {p} has no image in it")
        frame = next(container.decode(video=0), None)
    if frame is None:
        raise MediaError(f"image file {p} could not be decoded (no picture found)")
    rgba = _frame_to_rgb(frame, "rgba").astype(np.float32) / 255.0
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + (1.0 - alpha)  # over white
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    if size is not None:
        image = resize_crop(image, size)
    return image.mul(2).sub(1).clamp(-1, 1)


def resize_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, H, W]``: center-crop to the aspect ratio of ``size=(H, W)``, then bicubic resize."""
    th, tw = int(size[0]), int(size[1])
    if th <= 0 or tw <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    _, h, w = image.shape
    if w * th > h * tw:  # too wide: crop width
        cw, ch = max(1, round(h * tw / th)), h
    else:  # too tall: crop height
        cw, ch = w, max(1, round(w * th / tw))
    top, left = (h - ch) // 2, (w - cw) // 2
    image = image[:, top : top + ch, left : left + cw]
    if (ch, cw) != (th, tw):
        lo, hi = float(image.min()), float(image.max())
        image = F.interpolate(image[None].float(), size=(th, tw), mode="bicubic", antialias=True)[0]
        image = image.clamp(lo, hi)  # bicubic overshoots at edges
    return image


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write ``[3, H, W]`` in [-1, 1] as an RGB PNG (atomically). Returns the path."""
    path = Path(path)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    rgb = to_uint8(image).permute(1, 2, 0).contiguous().cpu().numpy()
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    data = b"".join(bytes(pkt) for pkt in [*codec.encode(frame), *codec.encode(None)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------- audio


def _iter_audio(path: str | os.PathLike, sample_rate: int) -> Iterator[np.ndarray]:
    """Decode the first audio stream of any FFmpeg-readable file as float32 mono blocks at ``sample_rate``."""
    p = _check_file(path, "audio")
    with _open_input(p, "audio") as container:
        if not container.streams.audio:
            raise MediaError(f"audio file {p} has no audio stream")
        stream = container.streams.audio[0]
        # The resampler converts to planar float at the target rate and keeps filter state across frames (so
        # the blocks join without clicks); it must be flushed to get its last samples. The channels are then
        # averaged here rather than by FFmpeg's mono downmix, which adds stereo channels at 1/sqrt(2) each
        # (a full-scale stereo file would come out at 1.41).
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
        # AAC decoders emit the encoder's padding after the last real sample; in MP4/MOV the edit list gives the
        # exact track length, so stop there (FFmpeg already drops the priming samples at the start). Other
        # containers either trim themselves (Ogg, MP3 with a LAME tag) or only estimate durations (plain MP3).
        remaining = None
        if "mp4" in container.format.name and stream.duration and stream.time_base:
            remaining = round(float(stream.duration * stream.time_base) * sample_rate)

        def emit(frames):
            nonlocal remaining
            for out in frames:
                samples = out.to_ndarray().mean(axis=0, dtype=np.float32)  # [channels, n] -> [n]
                if remaining is not None:
                    samples, remaining = samples[:remaining], max(0, remaining - samples.size)
                if samples.size:
                    yield samples

        for frame in container.decode(stream):
            yield from emit(resampler.resample(frame))
        yield from emit(resampler.resample(None))


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode wav/mp3/m4a/aac/flac/ogg/opus or the audio track of a video -> float32 mono ``[samples]``.

    Any input rate and channel layout: resampled to ``sample_rate`` by FFmpeg, channels averaged. Raises
    MediaError for a missing, undecodable or empty (0 samples) file, or one without an audio stream.
    """
    blocks = list(_iter_audio(path, sample_rate))
    wav = np.concatenate(blocks).astype(np.float32, copy=False) if blocks else np.zeros(0, np.float32)
    if wav.size == 0:
        raise MediaError(f"audio file {Path(path)} contains no audio samples")
    return wav


class AudioChunks:
    """Consecutive chunks of ``chunk_samples`` mono samples from an audio file or a 1-D array.

    For streaming engines that consume audio as it arrives: a file is decoded lazily, so the first chunk is
    available before the whole file is read. Each chunk is float32 ``[chunk_samples]``; the last one is
    shorter unless ``pad_last`` (then zero-padded to full length)::

        for chunk in AudioChunks("speech.wav", chunk_samples=16000 // 25 * 4):
            engine.push_audio(chunk)
    """

    def __init__(self, source: str | os.PathLike | np.ndarray, chunk_samples: int, sample_rate: int = SAMPLE_RATE,
                 pad_last: bool = False):
        if chunk_samples <= 0:
            raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        if isinstance(source, np.ndarray):
            source = np.asarray(source, dtype=np.float32)
            if source.ndim != 1:
                raise ValueError(f"audio array must be 1-D [samples], got shape {source.shape}")
        else:
            _check_file(source, "audio")  # fail at construction, not at the first next()
        self.source, self.chunk_samples = source, int(chunk_samples)
        self.sample_rate, self.pad_last = sample_rate, pad_last

    def _blocks(self) -> Iterator[np.ndarray]:
        if isinstance(self.source, np.ndarray):
            yield self.source
        else:
            yield from _iter_audio(self.source, self.sample_rate)

    def __iter__(self) -> Iterator[np.ndarray]:
        n = self.chunk_samples
        pending = np.zeros(0, np.float32)
        total = 0
        for block in self._blocks():
            pending = np.concatenate([pending, block]) if pending.size else block
            while pending.size >= n:
                yield pending[:n].copy()
                pending = pending[n:]
                total += n
        total += pending.size
        if total == 0 and not isinstance(self.source, np.ndarray):
            raise MediaError(f"audio file {Path(self.source)} contains no audio samples")
        if pending.size:
            yield np.pad(pending, (0, n - pending.size)) if self.pad_last else pending.copy()


def write_wav(path: str | os.PathLike, wav: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE,
              subtype: str = "PCM_16") -> Path:
    """Write mono ``[samples]`` (or ``[samples, channels]``) float audio in [-1, 1] as a WAV, atomically."""
    import soundfile as sf

    path = Path(path)
    wav = np.asarray(wav.detach().cpu() if isinstance(wav, torch.Tensor) else wav, dtype=np.float32)
    if wav.ndim not in (1, 2):
        raise ValueError(f"wav must be [samples] or [samples, channels], got shape {wav.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_path(path)
    try:
        sf.write(str(tmp), np.clip(wav, -1.0, 1.0), int(sample_rate), subtype=subtype, format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------- video


class _NpyAppender:
    """Append uint8 blocks ``[t, ...]`` to a ``.npy`` on disk, fixing up the length in the header at the end.

    Keeps memory flat for arbitrarily long videos (a list of arrays saved at close would not); the header is a
    fixed 128 bytes so it can be rewritten in place once the final frame count is known.
    """

    HEADER = 128

    def __init__(self, path: Path):
        self.path, self.shape, self.count = path, None, 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER)

    def append(self, block: np.ndarray) -> None:
        if self.shape is None:
            self.shape = block.shape[1:]
        self.file.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
        self.count += block.shape[0]

    def close(self) -> None:
        shape = (self.count, *(self.shape or ()))
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (shape,)
        header = header.ljust(self.HEADER - 10 - 1) + "\n"  # magic(6) + version(2) + length(2) + text
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1"))
        self.file.close()


class VideoWriter:
    """Streaming H.264/yuv420p MP4 writer with an optional AAC audio track.

    Frames are float ``[T, 3, H, W]`` in [-1, 1] (a tensor or an array), passed in any number of
    :meth:`write` calls as a generator finishes blocks; each block is encoded immediately, nothing is
    buffered to the end. ``audio`` is mono float ``[samples]`` at ``sample_rate``; it is encoded alongside the
    video as far as the video has got (so the file is properly interleaved) and is trimmed to the video's
    duration on close (a shorter audio just ends early).

    H.264 in yuv420p needs even width and height: odd sizes are padded by one replicated row/column on the
    bottom/right (the lossless frames file keeps the original size). Colours are encoded and tagged as
    BT.709 limited range, which players and :func:`read_video` both honour.

    The file is written to ``.name.partial.mp4`` in the same folder and renamed onto ``path`` only when
    :meth:`close` succeeds; an exception inside ``with`` deletes it, leaving nothing under ``path``.
    ``frames_path``: also store the exact uint8 frames (:func:`to_uint8`, ``[T, 3, H, W]``, unpadded) as a
    ``.npy`` (streamed to disk, atomic the same way), for bit-exact comparisons that H.264 cannot give::

        with VideoWriter("out.mp4", fps=25, audio=wav, sample_rate=16000) as w:
            for block in engine.stream():
                w.write(block)
    """

    def __init__(self, path: str | os.PathLike, fps: float = VIDEO_FPS, audio: np.ndarray | torch.Tensor | None = None,
                 sample_rate: int = SAMPLE_RATE, frames_path: str | os.PathLike | None = None, crf: int = 18,
                 preset: str = "medium", audio_bitrate: int = 96000):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001, 25 -> 25
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if audio is not None:
            audio = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float32)
            if audio.ndim != 1:
                raise ValueError(f"audio must be mono [samples], got shape {audio.shape}")
            audio = np.clip(audio, -1.0, 1.0)
        self.audio, self.sample_rate = audio, int(sample_rate)
        self.frames_path = Path(frames_path) if frames_path is not None else None
        self.crf, self.preset, self.audio_bitrate = crf, preset, audio_bitrate
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the input frames
        self._tmp = _partial_path(self.path)
        self._frames_tmp = _partial_path(self.frames_path) if self.frames_path is not None else None
        self._container = self._vstream = self._astream = self._npy = None
        self._audio_pos = 0  # samples already handed to the AAC encoder
        self._closed = False

    # -- setup, done on the first block because the size is only known then
    def _open(self, h: int, w: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": "+faststart"} if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") else {}
        try:
            self._container = av.open(str(self._tmp), "w", options=options)
        except (av.FFmpegError, ValueError) as err:
            raise MediaError(f"cannot create video file {self.path}: {_ffmpeg_reason(err)}") from None
        vs = self._container.add_stream("libx264", rate=self.fps)
        vs.width, vs.height = w + w % 2, h + h % 2
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = 1 / self.fps
        vs.options = {"crf": str(self.crf), "preset": self.preset}
        cc = vs.codec_context
        cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc = 1, 1, 1, 1  # BT.709, limited range
        self._vstream = vs
        if self.audio is not None and self.audio.size:
            a = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
            a.bit_rate = self.audio_bitrate
            self._astream = a
        if self._frames_tmp is not None:
            self.frames_path.parent.mkdir(parents=True, exist_ok=True)
            self._npy = _NpyAppender(self._frames_tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode a block of frames ``[T, 3, H, W]`` (float, [-1, 1]); every block must have the same H, W."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is already closed")
        frames = torch.as_tensor(frames)
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be floats in [-1, 1], got {frames.dtype}")
        if frames.shape[0] == 0:
            return
        if not bool(torch.isfinite(frames).all()):
            raise ValueError("frames contain NaN or inf")  # quantising them would silently hide a model bug
        h, w = frames.shape[2], frames.shape[3]
        if self.size is None:
            self.size = (h, w)
            self._open(h, w)
        elif self.size != (h, w):
            raise ValueError(f"frame size changed from {self.size} to {(h, w)} within one video")
        u8 = to_uint8(frames).cpu().numpy()  # [T, 3, H, W]
        if self._npy is not None:
            self._npy.append(u8)
        hwc = u8.transpose(0, 2, 3, 1)
        if h % 2 or w % 2:
            hwc = np.pad(hwc, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for img in hwc:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=1, dst_color_range=1)
            frame.pts = self.frames
            frame.time_base = 1 / self.fps
            self._container.mux(self._vstream.encode(frame))
            self.frames += 1
        self._encode_audio_until(self._audio_target())

    def _audio_target(self) -> int:
        """Audio samples that cover the frames written so far (never more than the audio has)."""
        if self._astream is None:
            return 0
        return min(self.audio.size, round(self.frames * self.sample_rate / self.fps))

    def _encode_audio_until(self, end: int) -> None:
        if self._astream is None or end <= self._audio_pos:
            return
        chunk = self.audio[self._audio_pos : end]
        frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_pos
        frame.time_base = Fraction(1, self.sample_rate)
        # PyAV re-chunks to the AAC frame size (1024) internally, so any block length works.
        self._container.mux(self._astream.encode(frame))
        self._audio_pos = end

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it (and the frames file) to the final name."""
        if self._closed:
            return self.path
        try:
            if self.frames == 0:
                raise MediaError(f"no frames were written to video {self.path}")
            self._encode_audio_until(self._audio_target())
            if self._astream is not None:
                self._container.mux(self._astream.encode(None))
            self._container.mux(self._vstream.encode(None))
            self._container.close()
            if self._npy is not None:
                self._npy.close()
                os.replace(self._frames_tmp, self.frames_path)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial files; nothing is left under the final names."""
        self._closed = True
        for closer in (getattr(self._container, "close", None), getattr(self._npy, "close", None)):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()
        for tmp in (self._tmp, self._frames_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def __del__(self):  # a writer dropped without close() (e.g. an exception outside `with`) leaves no litter
        if not getattr(self, "_closed", True):
            self.abort()


# ------------------------------------------------------------------------------------------ video readers
#
# Frames can be decoded by PyAV (the default) or by decord (the optional extra ``liveavatar[decord]``). Both sit
# behind :class:`VideoReader`; :func:`read_video` and :func:`iter_video_frames` take the reader's name. Both give
# the same uint8 RGB frames for the files this package writes (tested), and both apply display rotation.

READERS = ("pyav", "decord")


class VideoReader(Protocol):
    """A way to decode the frames of a video file; every failure is a one-line :class:`MediaError`."""

    name: str

    def read(self, path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
        """All frames, float32 ``[T, 3, H, W]`` in [-1, 1], and the stream's frame rate."""
        ...

    def iter_frames(self, path: str | os.PathLike, fps: float, size: tuple[int, int]) -> Iterator[torch.Tensor]:
        """Frames resampled to ``fps`` (nearest decoded frame) and resized to ``size``, one ``[3, H, W]`` at a time."""
        ...


def get_reader(name: str | VideoReader = "pyav") -> VideoReader:
    """The reader called ``name`` (``pyav`` or ``decord``); a reader object is passed through. An unknown name
    raises ``ValueError``; ``decord`` without the package installed raises ``ImportError`` naming the extra."""
    if not isinstance(name, str):
        return name
    if name == "pyav":
        return PyAVReader()
    if name == "decord":
        return DecordReader()
    raise ValueError(f"reader={name}: expected one of {', '.join(READERS)}")


def _to_float(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).movedim(-1, -3).float().div(127.5).sub(1)


def _nearest_frames(timed: Iterator[tuple[float | None, object]], fps: float, src_step: float, convert,
                    p: Path) -> Iterator[torch.Tensor]:
    """Pick, for each output time ``j / fps``, the decoded frame nearest to it, from ``(timestamp, frame)`` pairs in
    decoding order (a None timestamp: ``index * src_step``). ``convert(frame)`` turns a picked frame into the output;
    a frame picked for several output times is converted once. Yields ``floor(duration * fps)`` frames."""
    step = 1.0 / fps
    cache: dict = {}

    def picked(frame) -> torch.Tensor:
        if cache.get("frame") is not frame:
            cache.update(frame=frame, image=convert(frame))
        return cache["image"]

    prev, prev_t, t0, j = None, 0.0, None, 0
    for i, (t, frame) in enumerate(timed):
        t = t if t is not None else i * src_step
        t0 = t if t0 is None else t0
        t -= t0
        if prev is not None:
            while j * step <= (prev_t + t) / 2:  # output time closer to the previous frame
                yield picked(prev)
                j += 1
        prev, prev_t = frame, max(t, prev_t)
    if prev is None:
        raise MediaError(f"video file {p} contains no frames")
    # A small tolerance absorbs timestamp rounding (e.g. Matroska's milliseconds).
    total = math.floor((prev_t + src_step) * fps + 0.05)
    while j < total:
        yield picked(prev)
        j += 1


class PyAVReader:
    """Decoding with PyAV (FFmpeg): colour conversion from the frame's YUV tags, display rotation applied."""

    name = "pyav"

    def read(self, path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
        p = _check_file(path, "video")
        frames = []
        with _open_input(p, "video") as container:
            if not container.streams.video:
                raise MediaError(f"video file {p} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            for frame in container.decode(stream):
                frames.append(_frame_to_rgb(frame, "rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        if not frames:
            raise MediaError(f"video file {p} contains no frames")
        return _to_float(np.stack(frames)), float(rate) if rate else 0.0

    def iter_frames(self, path: str | os.PathLike, fps: float, size: tuple[int, int]) -> Iterator[torch.Tensor]:
        p = _check_file(path, "video")
        with _open_input(p, "video") as container:
            if not container.streams.video:
                raise MediaError(f"video file {p} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-threaded decoding; frames come out the same
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            src_step = 1.0 / float(rate) if rate else 1.0 / fps
            # Only picked frames are converted to RGB and resized.
            timed = ((frame.time, frame) for frame in container.decode(stream))
            yield from _nearest_frames(timed, fps, src_step, lambda f: resize_crop(_to_float(_frame_to_rgb(f)), size), p)


class DecordReader:
    """Decoding with decord (``pip install 'liveavatar[decord]'``), which converts every frame to RGB itself.

    decord does not apply display rotation; it is read from the first frame's side data with PyAV and applied
    here, so phone videos come out upright as with :class:`PyAVReader`.
    """

    name = "decord"

    def __init__(self):
        try:
            import decord
            from decord._ffi.base import DECORDError
        except ImportError:
            raise ImportError("reader=decord needs the decord package: pip install 'liveavatar[decord]' "
                              "(or use reader=pyav)") from None
        self._decord, self._errors = decord, (DECORDError, RuntimeError)

    def _call(self, p: Path, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with decord's errors (multi-line C++ logs) turned into a one-line MediaError."""
        try:
            return fn(*args, **kwargs)
        except self._errors as err:
            lines = [line.split("ERROR", 1)[-1].strip() for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if line), type(err).__name__)
            raise MediaError(f"cannot {what} video file {p} with decord: {reason}") from None

    @staticmethod
    def _rgb(frame) -> np.ndarray:
        """A decord frame -> uint8 ``[H, W, 3]``. decord 0.6 derives the channel count from the padded row stride:
        when that is a whole multiple of the width other than 3 (e.g. 48 or 16 pixels wide) the frame comes back as
        ``[H, W, 4]`` or ``[H, W, 6]`` holding padded RGB rows; those rows are cut back to ``W * 3`` bytes."""
        rgb = frame.asnumpy()
        if rgb.shape[-1] != 3:
            h, w = rgb.shape[:2]
            rgb = np.ascontiguousarray(rgb).reshape(h, -1)[:, : w * 3].reshape(h, w, 3)
        return rgb

    def _open(self, p: Path):
        vr = self._call(p, "open", self._decord.VideoReader, str(p), ctx=self._decord.cpu(0))
        if len(vr) == 0:
            raise MediaError(f"video file {p} contains no frames")
        return vr

    @staticmethod
    def _rotation(p: Path) -> int:
        """Counter-clockwise quarter turns of the display matrix, read with PyAV (as ``_frame_to_rgb`` does); this
        also rejects files without a video stream with PyAV's messages."""
        with _open_input(p, "video") as container:
            if not container.streams.video:
                raise MediaError(f"video file {p} has no video stream")
            frame = next(container.decode(video=0), None)
        rotation = getattr(frame, "rotation", 0) or 0
        return int(rotation // 90) % 4 if rotation % 90 == 0 else 0

    @staticmethod
    def _timestamps(p: Path, frames: int) -> list[float] | None:
        """Presentation times (seconds) of the ``frames`` frames from the container's packets, computed as PyAV's
        ``frame.time`` is, so that both readers pick the same frame at exact ties of the resampling; None when the
        packets do not match decord's frame count (then decord's own float32 timestamps are used)."""
        with _open_input(p, "video") as container:
            stream = container.streams.video[0]
            pts = sorted(pkt.pts for pkt in container.demux(stream) if pkt.size and pkt.pts is not None)
            tb = stream.time_base
        if len(pts) != frames or not tb:
            return None
        return [float(t) * tb.numerator / tb.denominator for t in pts]

    def read(self, path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
        p = _check_file(path, "video")
        turns = self._rotation(p)
        vr = self._open(p)
        n = len(vr) if max_frames is None else min(len(vr), max_frames)
        # Frame by frame: get_batch fails outright on the widths that _rgb repairs.
        rgb = np.stack([self._rgb(self._call(p, "decode", vr.next)) for _ in range(n)])  # [T, H, W, 3] uint8
        if turns:
            rgb = np.rot90(rgb, k=turns, axes=(1, 2))
        return _to_float(rgb), float(vr.get_avg_fps() or 0.0)

    def iter_frames(self, path: str | os.PathLike, fps: float, size: tuple[int, int]) -> Iterator[torch.Tensor]:
        p = _check_file(path, "video")
        turns = self._rotation(p)
        vr = self._open(p)
        n = len(vr)
        starts = self._timestamps(p, n)
        if starts is None:
            starts = self._call(p, "read timestamps of", vr.get_frame_timestamp, list(range(n)))[:, 0]  # [n] s
        rate = vr.get_avg_fps()
        src_step = 1.0 / rate if rate else 1.0 / fps
        self._call(p, "seek in", vr.seek, 0)

        def convert(frame) -> torch.Tensor:
            rgb = self._rgb(frame)
            return resize_crop(_to_float(np.rot90(rgb, k=turns) if turns else rgb), size)

        timed = ((float(starts[i]), self._call(p, "decode", vr.next)) for i in range(n))
        yield from _nearest_frames(timed, fps, src_step, convert, p)


def read_video(path: str | os.PathLike, max_frames: int | None = None,
               reader: str | VideoReader = "pyav") -> tuple[torch.Tensor, float]:
    """Decode a video -> (frames float32 ``[T, 3, H, W]`` in [-1, 1], fps). Holds every frame in memory.

    For tests and data preparation. Display rotation (phone videos) is applied like :func:`read_image`.
    ``reader``: ``pyav`` (default) or ``decord`` (see :func:`get_reader`).
    """
    return get_reader(reader).read(path, max_frames)


def iter_video_frames(path: str | os.PathLike, fps: float, size: tuple[int, int],
                      reader: str | VideoReader = "pyav") -> Iterator[torch.Tensor]:
    """Decode ``path`` frame by frame and yield frames at ``fps``: float32 ``[3, H, W]`` in [-1, 1], ``size=(H, W)``.

    Output frame ``j`` (time ``j / fps`` from the first decoded frame) is the decoded frame whose timestamp is
    nearest to it; the clip lasts until the last frame's end, and yields ``floor(duration * fps)`` frames (a small
    tolerance absorbs timestamp rounding, e.g. Matroska's milliseconds). Picked frames are resized
    (:func:`resize_crop`, per frame), and only the current and previous frames are held, so long or
    high-resolution clips stream. Colour conversion and rotation are those of :func:`read_video`.
    ``reader``: ``pyav`` (default) or ``decord``.
    """
    return get_reader(reader).iter_frames(path, fps, size)


def probe(path: str | os.PathLike) -> dict:
    """Describe a media file without decoding it.

    Returns ``{'duration', 'fps', 'frames', 'width', 'height', 'has_video', 'has_audio', 'sample_rate',
    'audio_duration'}`` (seconds; video fields are 0 and audio fields None when the stream is absent).
    ``frames`` comes from the container's index, or from counting packets when the container has none (mkv).
    """
    p = _check_file(path, "media")
    with _open_input(p, "media") as container:
        info = {"duration": container.duration / 1e6 if container.duration else 0.0, "fps": 0.0, "frames": 0,
                "width": 0, "height": 0, "has_video": bool(container.streams.video),
                "has_audio": bool(container.streams.audio), "sample_rate": None, "audio_duration": None}
        if container.streams.audio:
            a = container.streams.audio[0]
            info["sample_rate"] = a.codec_context.sample_rate
            if a.duration is not None and a.time_base:
                info["audio_duration"] = float(a.duration * a.time_base)
        if container.streams.video:
            v = container.streams.video[0]
            rate = v.average_rate or v.guessed_rate or v.base_rate
            info.update(fps=float(rate) if rate else 0.0, width=v.codec_context.width, height=v.codec_context.height)
            if not info["width"] or not info["height"]:
                raise MediaError(f"video stream of {p} cannot be read (no picture size; corrupt file?)")
            frames = v.frames
            if not frames:
                frames = sum(1 for pkt in container.demux(v) if pkt.size)
            info["frames"] = int(frames)
    return info
