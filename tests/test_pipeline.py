"""LiveAvatarPipeline: loaded once, it streams request after request, each exactly what ``infer.py`` writes for
the same inputs; live audio arrives in chunks and is turned into features causally as it comes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from liveavatar import media
from liveavatar.components import Components, UserError
from liveavatar.data import toy
from liveavatar.engine.stream import EngineSettings
from liveavatar.inference import run
from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.pipeline import LiveAvatarPipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE, SPEECH = ROOT / "data/example/reference.png", ROOT / "data/example/speech.wav"


def config(out: Path, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("infer", [f"image={IMAGE}", f"audio={SPEECH}", f"output.path={out}/out.mp4", "output.frames=true",
                                 *overrides])


def written(cfg) -> np.ndarray:
    """The exact uint8 frames ``[T, 3, H, W]`` that infer.py's run writes for ``cfg``."""
    run(cfg)
    return np.load(Path(cfg.output.path).with_suffix(".frames.npy"))


def streamed(stream, first: int = 0) -> np.ndarray:
    """The rest of ``stream`` (from block ``first``) as uint8 frames ``[T, 3, H, W]``."""
    blocks = list(stream)
    assert [b.index for b in blocks] == list(range(first, first + len(blocks)))
    assert all(b.frames.dtype == torch.float32 and b.frames.shape[1:] == (3, 32, 32) for b in blocks)
    return media.to_uint8(torch.cat([b.frames for b in blocks])).numpy()


@pytest.fixture(scope="module")
def other_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A second request: a toy-world face and its 0.6 s of speech, as files."""
    folder = tmp_path_factory.mktemp("other")
    clip = toy.make_clip(11, int(0.6 * toy.FPS))
    media.write_image(folder / "face.png", clip.reference)
    media.write_wav(folder / "talk.wav", clip.wav, toy.SAMPLE_RATE, subtype="FLOAT")
    return folder / "face.png", folder / "talk.wav"


def test_one_pipeline_streams_two_requests_as_infer_writes_them(tmp_path, tiny_checkpoint, other_inputs):
    face, talk = other_inputs
    trained = f"checkpoint={tiny_checkpoint}"
    pipe = LiveAvatarPipeline.from_config(config(tmp_path, trained))
    first = pipe.stream(IMAGE, SPEECH, max_seconds=1)
    assert (first.blocks, first.video_frames, first.fps) == (9, 25, 25.0)  # 1 s: 25 frames in blocks of 3
    a = streamed(first)
    b = streamed(pipe.stream(face, talk))
    a_again = streamed(pipe.stream(IMAGE, SPEECH, max_seconds=1))  # nothing of a request outlives it

    assert a.shape == (25, 3, 32, 32) and b.shape == (15, 3, 32, 32)
    assert np.array_equal(a, written(config(tmp_path / "a", trained, "max_seconds=1")))
    assert np.array_equal(b, written(config(tmp_path / "b", trained, f"image={face}", f"audio={talk}")))
    assert np.array_equal(a, a_again)
    assert not np.array_equal(a[:15], b)  # the requests differ

    # In-memory inputs: the image as a tensor in [-1, 1], the audio as a waveform, the prompt as embeddings.
    image, wav = media.read_image(face, size=(32, 32)), media.read_audio(talk)
    embeddings = pipe.text_context("a person talking to the camera")
    assert np.array_equal(b, streamed(pipe.stream(image, torch.from_numpy(wav), embeddings)))
    assert not np.array_equal(b, streamed(pipe.stream(image, wav, seed=1)))  # another noise seed


def test_live_chunked_audio(tmp_path, tiny_checkpoint):
    """An iterable of chunks streams causally, block by block as the audio arrives: the same frames as
    ``audio_features.streaming=true`` (which feeds the file as live input), and the first block leaves before
    the source is exhausted."""
    trained = f"checkpoint={tiny_checkpoint}"
    pipe = LiveAvatarPipeline.from_config(config(tmp_path, trained, "audio_features.lookback_s=0.5"))
    pulled = []

    def microphone():
        for chunk in media.AudioChunks(SPEECH, chunk_samples=1000):  # 62.5 ms of audio at a time
            pulled.append(len(chunk))
            yield chunk

    stream = pipe.stream(IMAGE, microphone(), max_seconds=1)
    assert stream.blocks is None and stream.video_frames is None and stream.audio is None
    first = next(stream)
    assert first.index == 0 and sum(pulled) < 16000  # a block's audio (0.12 s) and not much more
    live = np.concatenate([media.to_uint8(first.frames).numpy(), streamed(stream, first=1)])
    assert stream.video_frames == 25 and sum(pulled) >= 16000

    expected = written(config(tmp_path / "s", trained, "max_seconds=1", "audio_features.streaming=true",
                              "audio_features.lookback_s=0.5"))
    assert np.array_equal(live, expected)
    # The tiny preset's energy/mel features stream exactly: the offline features give the same video.
    offline = written(config(tmp_path / "o", trained, "max_seconds=1"))
    assert np.abs(live.astype(int) - offline.astype(int)).max() <= 1

    # The last block is cut where the audio ends (here inside a block).
    short = streamed(pipe.stream(IMAGE, iter([media.read_audio(SPEECH)[:5000]])))
    assert short.shape[0] == 5000 * 25 // 16000


def test_request_errors_are_one_line_user_errors(tmp_path):
    pipe = LiveAvatarPipeline.from_config(config(tmp_path))
    cases = [
        (lambda: pipe.stream(torch.zeros(32, 32), SPEECH), "image: expected a float tensor"),
        (lambda: pipe.stream("/nonexistent/face.png", SPEECH), "face.png"),
        (lambda: pipe.stream(IMAGE, np.zeros((2, 100), np.float32)), "audio: expected mono samples"),
        (lambda: pipe.stream(IMAGE, np.zeros(100, np.float32)), "audio: shorter than one video frame"),
        (lambda: pipe.stream(IMAGE, SPEECH, torch.zeros(1, 4, 7)), "prompt: width 7, the model needs 32"),
        (lambda: list(pipe.stream(IMAGE, iter([np.zeros((2, 100))]))), "audio chunk: expected mono samples"),
        (lambda: list(pipe.stream(IMAGE, iter([]))), "the live source ended before one video frame"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="engine=tpp: expected one of sequential, stream_batch"):
        LiveAvatarPipeline(pipe.model, pipe.components, pipe.settings, engine="tpp")


def test_the_video_follows_the_preset_frame_rate(tmp_path):
    """``model.fps=12.5``: the audio features, the frame count and the mp4 all run at 12.5 fps."""
    report = run(config(tmp_path, "max_seconds=1", "model.fps=12.5"))
    info = media.probe(tmp_path / "out.mp4")
    assert report.frames == 12 and info["frames"] == 12 and abs(info["fps"] - 12.5) < 1e-6


def test_a_dit_without_audio_streams_as_long_as_the_audio():
    """Without audio conditioning the audio still sets the length: whole or live, block by block."""
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), resolve=True)
    dit = DiTConfig.from_dict({**preset["dit"], "audio_dim": 0, "audio_blocks": [], "audio_modulation": False})
    torch.manual_seed(0)
    pipe = LiveAvatarPipeline(AvatarDiT(dit).eval(), Components(preset), EngineSettings(steps=[1000]))
    wav = media.read_audio(SPEECH)[:8000]  # 0.5 s: 12 frames
    whole = streamed(pipe.stream(IMAGE, wav))
    live = streamed(pipe.stream(IMAGE, (wav[i : i + 700] for i in range(0, len(wav), 700))))
    assert whole.shape == live.shape == (12, 3, 32, 32) and np.array_equal(whole, live)
