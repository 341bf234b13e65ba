"""Media I/O (liveavatar.media): audio decoding/resampling round trips, the streaming MP4 writer (frame count,
fps, size, audio track, colour fidelity, lossless frames, atomic writes) and clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from liveavatar.media import (
    AudioChunks,
    MediaError,
    VideoWriter,
    probe,
    read_audio,
    read_image,
    read_video,
    to_uint8,
    write_image,
    write_wav,
)

REPO = Path(__file__).resolve().parents[1]


def smooth_video(t: int, h: int, w: int) -> torch.Tensor:
    """Smooth coloured gradients that move over time: ``[T, 3, H, W]`` in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frames = [torch.stack([0.8 * x, 0.7 * y, 0.6 * torch.sin(2 * x * y + k / 4)]) for k in range(t)]
    return torch.stack(frames)


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def encode_audio(path: Path, wav: np.ndarray, rate: int, codec: str) -> None:
    """Encode mono audio with PyAV (mp3 / m4a) to produce compressed test inputs."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(wav[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        if fmt != "fltp":
            frame = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)[0]
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# ------------------------------------------------------------------------------------------------ audio


def test_wav_44k_stereo_to_16k_mono(tmp_path):
    left, right = tone(2.0, 44100, 440), tone(2.0, 44100, 440)
    sf.write(tmp_path / "in.wav", np.stack([left, right], 1), 44100)
    wav = read_audio(tmp_path / "in.wav", sample_rate=16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - 32000) <= 320  # within 1%
    # Channels are averaged: identical channels keep their level (FFmpeg's downmix would give 0.71).
    assert np.abs(wav[1000:-1000]).max() == pytest.approx(0.5, abs=0.02)
    # Frequency preserved through resampling: the spectrum peaks at 440 Hz.
    spectrum = np.abs(np.fft.rfft(wav[:16000]))  # 1 s window: 1 Hz bins
    assert abs(np.argmax(spectrum) - 440) <= 2


@pytest.mark.parametrize("ext,codec", [("mp3", "libmp3lame"), ("m4a", "aac")])
def test_compressed_audio_round_trip(tmp_path, ext, codec):
    src = tone(1.5, 44100, 300, 0.4)
    encode_audio(tmp_path / f"in.{ext}", src, 44100, codec)
    wav = read_audio(tmp_path / f"in.{ext}")
    assert abs(wav.size / 16000 - 1.5) < 0.05  # codec padding is at most a frame or two
    assert np.sqrt(np.mean(wav[4000:20000] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.1)


def test_audio_chunks_file_and_array(tmp_path):
    src = tone(1.0, 16000)
    write_wav(tmp_path / "a.wav", src, 16000)
    chunks = list(AudioChunks(tmp_path / "a.wav", chunk_samples=3000))
    assert [c.size for c in chunks] == [3000] * 5 + [1000]
    assert np.allclose(np.concatenate(chunks), src, atol=1e-3)  # 16-bit WAV quantisation
    padded = list(AudioChunks(src, chunk_samples=3000, pad_last=True))
    assert [c.size for c in padded] == [3000] * 6 and not padded[-1][1000:].any()


def test_write_wav_atomic_and_exact(tmp_path):
    src = tone(0.5, 16000)
    out = write_wav(tmp_path / "sub" / "o.wav", src, 16000, subtype="FLOAT")
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.wav"]
    assert np.array_equal(read_audio(out), src)


# ------------------------------------------------------------------------------------------------ video


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One 2 s video (odd size 45x61, 25 fps) with 3 s of audio, written in uneven blocks, plus its inputs."""
    folder = tmp_path_factory.mktemp("video")
    frames = smooth_video(50, 45, 61)
    audio = tone(3.0, 16000, 250)
    path, npy = folder / "out.mp4", folder / "frames.npy"
    with VideoWriter(path, fps=25, audio=audio, sample_rate=16000, frames_path=npy) as writer:
        for start, stop in [(0, 1), (1, 13), (13, 37), (37, 50)]:
            writer.write(frames[start:stop])
    return folder, path, npy, frames, audio


def test_video_writer_probe(written):
    folder, path, npy, frames, _ = written
    info = probe(path)
    assert info["frames"] == 50 and info["fps"] == 25.0
    assert (info["height"], info["width"]) == (46, 62)  # padded to even for yuv420p
    assert info["has_audio"] and info["sample_rate"] == 16000
    assert abs(info["duration"] - 2.0) < 0.05
    assert sorted(p.name for p in folder.iterdir()) == ["frames.npy", "out.mp4"]  # no partial files left


def test_video_frames_close_and_lossless_exact(written):
    _, path, npy, frames, _ = written
    decoded, fps = read_video(path)
    assert fps == 25.0 and decoded.shape == (50, 3, 46, 62)
    err = (decoded[:, :, :45, :61] - frames).abs()
    assert err.mean() < 0.05, err.mean()  # BT.709 tagging round-trips: no colour shift
    lossless = np.load(npy)
    assert lossless.dtype == np.uint8 and lossless.shape == (50, 3, 45, 61)
    assert np.array_equal(lossless, to_uint8(frames).numpy())


def test_video_audio_track_trimmed_to_video(written):
    _, path, _, _, audio = written
    wav = read_audio(path)
    assert abs(wav.size / 16000 - 2.0) < 0.02  # the 3 s of audio is cut at the video's 2 s
    # In sync: the decoded track lines up with the source to the sample.
    seg = wav[4000:8000]
    lags = range(-40, 41)
    best = max(lags, key=lambda k: float(np.dot(seg, audio[4000 + k : 8000 + k])))
    assert best == 0


def test_video_writer_streams_to_partial_file(tmp_path):
    """Blocks are encoded as they arrive: the hidden partial file grows before close, then is renamed."""
    noise = torch.rand(100, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1  # ~8 KB a frame
    partial = tmp_path / ".s.partial.mp4"
    with VideoWriter(tmp_path / "s.mp4", fps=30000 / 1001) as writer:
        writer.write(noise)  # x264 holds back ~40 frames (lookahead); the file is written in 256 KiB pieces
        assert partial.stat().st_size > 200_000 and not (tmp_path / "s.mp4").exists()
    assert not partial.exists()
    info = probe(tmp_path / "s.mp4")
    assert info["frames"] == 100 and info["fps"] == pytest.approx(29.97, abs=0.01)


def test_video_writer_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / "bad.mp4", audio=tone(1.0, 16000), frames_path=tmp_path / "bad.npy") as writer:
            writer.write(smooth_video(10, 32, 32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_rejects_bad_frames(tmp_path):
    with VideoWriter(tmp_path / "v.mp4") as writer:
        with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
            writer.write(torch.zeros(3, 4, 16, 16))
        writer.write(torch.zeros(2, 3, 16, 16))
        with pytest.raises(ValueError, match="size changed"):
            writer.write(torch.zeros(2, 3, 16, 18))
    assert probe(tmp_path / "v.mp4")["frames"] == 2 and not probe(tmp_path / "v.mp4")["has_audio"]
    with pytest.raises(MediaError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert not (tmp_path / "empty.mp4").exists()


# ------------------------------------------------------------------------------------------------ images


def test_image_round_trip_and_resize(tmp_path):
    img = smooth_video(1, 40, 60)[0]
    write_image(tmp_path / "i.png", img)
    back = read_image(tmp_path / "i.png")
    assert back.shape == (3, 40, 60) and back.dtype == torch.float32
    assert torch.equal(back, to_uint8(img).float() / 127.5 - 1)  # PNG is lossless
    square = read_image(tmp_path / "i.png", size=(32, 32))  # center crop 40x40, then resize
    assert square.shape == (3, 32, 32) and square.min() >= -1 and square.max() <= 1
    ref = read_image(REPO / "data" / "example" / "reference.png", size=(64, 48))
    assert ref.shape == (3, 64, 48)


def test_jpeg_exif_rotation(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # left half white
    image = pil.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (3, 80, 40)
    assert out[:, :30].mean() > 0.9 and out[:, 50:].mean() < -0.9  # the white half is now on top


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_file(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.txt").write_text("not audio\n" * 50)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    write_image(tmp_path / "still.png", torch.zeros(3, 8, 8))
    cases = [
        (read_image, "missing.png"),
        (read_image, "corrupt.png"),
        (read_image, "notes.txt"),
        (read_audio, "missing.wav"),
        (read_audio, "empty.wav"),
        (read_audio, "notes.txt"),
        (read_audio, "still.png"),  # no audio stream
        (read_video, "empty.wav"),  # no video stream
        (probe, "corrupt.png"),
    ]
    for fn, name in cases:
        with pytest.raises(MediaError) as info:
            fn(tmp_path / name)
        message = str(info.value)
        assert name in message and "\n" not in message, (fn.__name__, message)
    with pytest.raises(MediaError, match="missing.wav"):
        AudioChunks(tmp_path / "missing.wav", 100)
    assert issubclass(MediaError, ValueError)


# ----------------------------------------------------------------------------------------- video readers


def test_decord_reader_gives_the_pyav_frames(written, tmp_path):
    """decord behind the same interface: the same frame count, fps and uint8 pixels as PyAV (identical, not merely
    close: both convert with the file's BT.709 limited-range tags), also resampled to other frame rates."""
    pytest.importorskip("decord")
    from liveavatar.media import get_reader, iter_video_frames

    assert get_reader("decord").name == "decord" and get_reader("pyav").name == "pyav"
    # 48 pixels wide: decord 0.6 reports such frames as [H, W, 4] (see DecordReader._rgb); 30 fps Matroska.
    other = tmp_path / "w48.mkv"
    with VideoWriter(other, fps=30) as writer:
        writer.write(smooth_video(36, 32, 48))
    for path, count, fps in [(written[1], 50, 25.0), (other, 36, 30.0)]:
        a, fa = read_video(path)
        b, fb = read_video(path, reader="decord")
        assert a.shape == b.shape and a.shape[0] == count and fa == fb == fps
        assert torch.equal(to_uint8(a), to_uint8(b))
        assert torch.equal(read_video(path, max_frames=7, reader="decord")[0], a[:7])
        # 30 -> 16 fps has exact ties (output frame 4 sits midway between source frames 7 and 8).
        for rate in (25, 16, 30):
            x = list(iter_video_frames(path, rate, (24, 24)))
            y = list(iter_video_frames(path, rate, (24, 24), reader="decord"))
            assert len(x) == len(y) > 0 and all(torch.equal(p, q) for p, q in zip(x, y)), (path.name, rate)


def test_decord_reader_errors_are_one_line(tmp_path):
    pytest.importorskip("decord")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    sf.write(tmp_path / "sound.wav", tone(0.5, 16000), 16000)
    for name in ("missing.mp4", "corrupt.mp4", "sound.wav"):
        with pytest.raises(MediaError) as info:
            read_video(tmp_path / name, reader="decord")
        assert name in str(info.value) and "\n" not in str(info.value)


def test_reader_names_and_missing_decord(monkeypatch):
    import sys

    from liveavatar.media import get_reader

    with pytest.raises(ValueError, match="reader=opencv: expected one of pyav, decord"):
        get_reader("opencv")
    monkeypatch.setitem(sys.modules, "decord", None)  # as if it were not installed
    with pytest.raises(ImportError) as info:
        read_video(REPO / "data/example/reference.png", reader="decord")
    assert "liveavatar[decord]" in str(info.value) and "\n" not in str(info.value)
