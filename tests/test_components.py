"""liveavatar.components: one place builds a preset's VAE, audio and text encoders (at the preset's frame rate)
and resolves devices and dtypes; no other module under src/ spells a sample rate or a frame rate."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from liveavatar import components, inference
from liveavatar.components import (
    SAMPLE_RATE, Components, UserError, build_audio_encoder, build_text_encoder, build_vae, resolve_device,
    resolve_dtype,
)
from liveavatar.data import toy
from liveavatar.evaluation.toy_bench import ToyBenchSettings
from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.audio import EnergyMelFeatures, Wav2Vec2Features
from liveavatar.models.text import RandomTextEncoder
from liveavatar.models.vae import PatchVAE

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "liveavatar"


def tiny() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), resolve=True)


def test_the_tiny_preset_builds_its_components():
    parts = Components(OmegaConf.load(ROOT / "conf/model/tiny.yaml"))  # a DictConfig or a plain mapping
    assert isinstance(parts.vae, PatchVAE) and parts.vae.space_factor == 2
    assert isinstance(parts.audio_encoder, EnergyMelFeatures) and parts.audio_encoder.feature_dim == 32
    assert isinstance(parts.text_encoder, RandomTextEncoder) and parts.text_encoder.text_dim == 32
    assert (parts.fps, parts.resolution, parts.sample_rate) == (25.0, (32, 32), 16000)
    assert parts.vae is parts.vae  # built once


def test_energy_mel_follows_the_preset_frame_rate():
    wav = np.random.default_rng(0).standard_normal(2 * SAMPLE_RATE).astype(np.float32) * 0.1
    at25 = build_audio_encoder(tiny())
    at12 = build_audio_encoder({**tiny(), "fps": 12.5})
    assert at25(wav).shape == (1, 50, 1, 32)
    assert at12(wav).shape == (1, 25, 1, 32)  # half the frame rate: half the frames, each over twice the audio
    assert (at12.hop, at25.hop) == (1280, 640)
    # The same analysis window as the toy world's envelope at that rate: the metrics and the features agree.
    assert at12.hop == int(round(toy.SAMPLE_RATE / 12.5))
    with pytest.raises(UserError, match="model.fps=0: must be positive"):
        build_audio_encoder({**tiny(), "fps": 0})


def test_bad_presets_are_one_line_user_errors(tmp_path):
    cases = [
        (lambda: build_audio_encoder({**tiny(), "audio_encoder": {"kind": "whisper"}}), "model.audio_encoder.kind=whisper"),
        (lambda: build_audio_encoder({**tiny(), "audio_encoder": {"kind": "wav2vec2", "path": None}}),
         "model.audio_encoder.path: the wav2vec2 preset needs"),
        (lambda: build_audio_encoder({**tiny(), "audio_encoder": {"kind": "wav2vec2", "path": str(tmp_path)}}),
         "no config.json"),
        (lambda: build_vae({**tiny(), "vae": {"kind": "wan", "path": None}}), "model.vae: vae kind 'wan' needs a path"),
        (lambda: build_vae({**tiny(), "vae": {"kind": "gan"}}), "model.vae: unknown vae kind"),
        (lambda: build_text_encoder({**tiny(), "text_encoder": {"kind": "umt5", "path": None}}), "model.text_encoder"),
        (lambda: Components({**tiny(), "resolution": "large"}), "model.resolution=large"),
        (lambda: Components({k: v for k, v in tiny().items() if k != "vae"}).vae, "model.vae: missing"),
    ]
    for build, message in cases:
        with pytest.raises(UserError, match=message) as err:
            build()
        assert "\n" not in str(err.value)


def test_the_vae_must_fit_the_dit():
    dit = DiTConfig.from_dict(tiny()["dit"])
    Components(tiny()).check(dit)
    with pytest.raises(UserError, match="must be divisible by 4"):
        Components({**tiny(), "resolution": [30, 32]}).check(dit)
    with pytest.raises(UserError, match="time factor 1 differs from model.dit.video_frames_per_latent=4"):
        Components(tiny()).check(DiTConfig.from_dict({**tiny()["dit"], "video_frames_per_latent": 4}))


def test_device_and_dtype_errors_are_one_line_user_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    bad = [(resolve_dtype, "int8", "dtype=int8: not a floating-point"), (resolve_dtype, "float99", "dtype=float99"),
           (resolve_device, "toaster", "device=toaster: not a torch device")]
    if not torch.cuda.is_available():
        bad.append((resolve_device, "cuda:0", "device=cuda:0: CUDA is not available"))
    for fn, value, message in bad:
        with pytest.raises(UserError, match=message) as err:
            fn(value)
        assert "\n" not in str(err.value)
    # Code that catches the old name catches the same class.
    assert inference.UserError is UserError and inference.resolve_device is resolve_device


def test_the_toy_bench_and_infer_build_the_same_components():
    """The toy bench's settings describe model=tiny: the same classes with the same settings, and the same
    outputs for the same input."""
    preset = tiny()
    model = AvatarDiT(DiTConfig.from_dict(preset["dit"]))
    infer_parts, bench_parts = Components(preset), Components(ToyBenchSettings().preset(model))
    wav = np.random.default_rng(1).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
    image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    for name in ("vae", "audio_encoder", "text_encoder"):
        assert type(getattr(infer_parts, name)) is type(getattr(bench_parts, name)), name
    assert torch.equal(infer_parts.vae.encode(image), bench_parts.vae.encode(image))
    assert torch.equal(infer_parts.audio_encoder(wav, 25), bench_parts.audio_encoder(wav, 25))
    prompt = ["a person talking to the camera"]
    assert torch.equal(infer_parts.text_encoder(prompt)[0], bench_parts.text_encoder(prompt)[0])
    assert (infer_parts.fps, infer_parts.resolution) == (bench_parts.fps, bench_parts.resolution)


def test_wav2vec2_is_built_on_the_device_asked_for(tmp_path):
    from tiny_models import save_tiny_wav2vec2

    path = save_tiny_wav2vec2(tmp_path / "w2v")
    encoder = build_audio_encoder({**tiny(), "audio_encoder": {"kind": "wav2vec2", "path": str(path)}}, "cpu")
    assert isinstance(encoder, Wav2Vec2Features) and encoder.device == torch.device("cpu")
    assert encoder(np.zeros(SAMPLE_RATE, np.float32), 10).shape[:2] == (1, 10)


# ----------------------------------------------------------------------------------------- no literal rates

RATES = {16000, 25}
OWNERS = {"components.py", "media.py"}  # where the package's rates are defined


def literal_rates(path: Path) -> list[str]:
    """``file:line`` of every number token equal to a sample rate or frame rate (comments and strings aside)."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NUMBER:
            value = ast.literal_eval(tok.string)
            if isinstance(value, (int, float)) and value in RATES:
                found.append(f"{path.relative_to(SRC)}:{tok.start[0]}: {tok.line.strip()}")
    return found


def test_only_the_components_and_media_modules_spell_the_rates():
    offenders = [hit for path in sorted(SRC.rglob("*.py")) if path.name not in OWNERS or path.parent != SRC
                 for hit in literal_rates(path)]
    assert not offenders, "rates written out outside components.py/media.py:\n" + "\n".join(offenders)
    # The scan does find them where they are defined (so the test above can fail).
    assert any("SAMPLE_RATE = 16000" in hit for hit in literal_rates(SRC / "media.py"))
    assert any("VIDEO_FPS = 25" in hit for hit in literal_rates(SRC / "media.py"))


def test_the_toy_world_and_its_metrics_share_the_package_rates():
    from liveavatar import media
    from liveavatar.metrics import toy as toy_metrics

    assert toy.SAMPLE_RATE == media.SAMPLE_RATE == components.SAMPLE_RATE
    assert toy.FPS == media.VIDEO_FPS
    # The metrics take their defaults from the renderer's module, not from constants of their own.
    assert toy_metrics.SAMPLE_RATE is toy.SAMPLE_RATE and toy_metrics.FPS is toy.FPS
