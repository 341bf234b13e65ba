"""The parts of a model preset besides the DiT -- its VAE, its audio encoder and its text encoder -- and the device
and dtype a command line names, built in one place for every stage that needs them: inference
(:mod:`liveavatar.pipeline`, ``infer.py``), preprocessing (:mod:`liveavatar.data.preprocess`), the toy bench
(:mod:`liveavatar.evaluation.toy_bench`) and training (:mod:`liveavatar.training.datamodule`).

A *preset* is the ``model`` config group (``conf/model/*.yaml``, as a ``DictConfig`` or a plain mapping): ``fps``,
``resolution``, ``dit`` (``text_dim``, ``text_len``, ``video_frames_per_latent``, ...), ``vae``,
``audio_encoder`` and ``text_encoder``. Audio is always handled at :data:`SAMPLE_RATE`; every frame rate comes
from the preset's ``fps``. Every problem is a :class:`UserError` whose message is one line naming the key.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from . import media
from .data import toy
from .models import audio as audio_models
from .models import text as text_models
from .models import vae as vae_models

SAMPLE_RATE = media.SAMPLE_RATE  # of every waveform the encoders see (what wav2vec2 expects)


class UserError(Exception):
    """A bad input or setting: its message is one line for the user."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ..."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"device={name}: not a torch device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"dtype={name}: not a floating-point torch dtype (float32, bfloat16, float16)")
    return dtype


def frames_in(samples: int, fps: float) -> int:
    """Whole video frames at ``fps`` that ``samples`` of audio at :data:`SAMPLE_RATE` cover (rounded down)."""
    return int(samples * fps // SAMPLE_RATE)


def _plain(node: Any) -> Any:
    """A config node as plain Python values (a DictConfig resolved; anything else as it is)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _section(preset: Mapping, key: str) -> dict:
    value = _plain(preset.get(key))
    if not isinstance(value, Mapping) or "kind" not in value:
        raise UserError(f"model.{key}: missing from the preset (expected a mapping with a kind)")
    return dict(value)


def preset_fps(preset: Mapping) -> float:
    """The preset's video frame rate (``model.fps``)."""
    try:
        fps = float(preset["fps"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"model.fps={preset.get('fps')}: expected a positive number of frames per second") from err
    if not fps > 0:
        raise UserError(f"model.fps={fps:g}: must be positive")
    return fps


def build_vae(preset: Mapping, device: str | torch.device = "cpu"):
    """``model.vae``: the Wan VAE from ``path`` (on ``device``) or the toy world's patch VAE (parameter-free).
    Returns a :class:`~liveavatar.models.vae.WanVAE` or :class:`~liveavatar.models.vae.PatchVAE`."""
    options = _section(preset, "vae")
    kind, path = options.pop("kind"), options.pop("path", None)
    if str(kind).lower() == "wan":
        # The patch VAE's keys (space_factor, ...) may linger in a toy preset switched to kind=wan: not Wan's.
        options = {"device": device, **({"dtype": options["dtype"]} if options.get("dtype") else {})}
    try:
        return vae_models.build_vae(kind, path, **options)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"model.vae: {err}") from err


def build_audio_encoder(preset: Mapping, device: str | torch.device = "cpu"):
    """``model.audio_encoder`` at the preset's frame rate: called as ``encoder(wav [samples], frames)`` ->
    ``[1, frames, layers, feat]`` (``num_layers``, ``feature_dim`` and ``device`` attributes).

    ``energy_mel``: weight-free log-mel + energy whose analysis hop is one video frame of ``model.fps``;
    ``wav2vec2``: all hidden states of a local wav2vec2 folder, resampled to the frames asked for."""
    options = _section(preset, "audio_encoder")
    kind = options["kind"]
    if kind == "energy_mel":
        return audio_models.EnergyMelFeatures(int(options.get("n_mels", 31)), sample_rate=SAMPLE_RATE,
                                              fps=preset_fps(preset), device=device)
    if kind == "wav2vec2":
        path = options.get("path")
        if not path:
            raise UserError("model.audio_encoder.path: the wav2vec2 preset needs a local wav2vec2 folder")
        try:
            return audio_models.Wav2Vec2Features(path, device=device)
        except (OSError, ValueError) as err:
            raise UserError(f"model.audio_encoder.path={path}: {err}") from err
    raise UserError(f"model.audio_encoder.kind={kind}: expected energy_mel or wav2vec2")


def build_text_encoder(preset: Mapping, device: str | torch.device = "cpu"):
    """``model.text_encoder`` for the DiT's ``text_dim`` and ``text_len``: called as ``encoder([prompt])`` ->
    ``(embeddings [1, L, text_dim], lengths [1])`` (a :class:`~liveavatar.models.text.TextEncoder`)."""
    options = _section(preset, "text_encoder")
    dit = _plain(preset.get("dit")) or {}
    try:
        return text_models.build_text_encoder(options["kind"], options.get("path"), int(dit["text_dim"]),
                                              int(dit["text_len"]), device, torch.float32)
    except KeyError as err:
        raise UserError(f"model.dit.{err.args[0]}: missing from the preset") from err
    except (OSError, ValueError) as err:
        raise UserError(f"model.text_encoder: {err}") from err


def toy_preset(dit: Any, resolution: tuple[int, int] = (32, 32), space_factor: int = 2, n_mels: int = 31,
               fps: float = toy.FPS) -> dict:
    """The component part of a toy-world preset (what ``conf/model/tiny.yaml`` spells): the patch VAE,
    ``energy_mel`` audio, the random text encoder, for ``dit`` (a ``DiTConfig`` or a mapping with ``text_dim``,
    ``text_len``)."""
    dit = dit.to_dict() if hasattr(dit, "to_dict") else dict(_plain(dit))
    return {
        "fps": fps, "resolution": [int(v) for v in resolution], "dit": dit,
        "vae": {"kind": "patch", "path": None, "space_factor": int(space_factor)},
        "audio_encoder": {"kind": "energy_mel", "path": None, "n_mels": int(n_mels)},
        "text_encoder": {"kind": "random", "path": None},
    }


class Components:
    """The VAE, audio encoder and text encoder of ``preset`` on ``device``, each built the first time it is used
    (so a 10 GB text encoder is never loaded for a run whose prompts all come as embeddings).

    Attributes: ``preset`` (plain dict), ``device``, ``fps`` (``model.fps``), ``resolution`` ``(H, W)``
    (``model.resolution``), ``sample_rate`` (:data:`SAMPLE_RATE`); ``vae``, ``audio_encoder``, ``text_encoder``.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, preset: Mapping, device: str | torch.device = "cpu"):
        self.preset = dict(_plain(preset))
        self.device = torch.device(device)
        self.fps = preset_fps(self.preset)
        resolution = self.preset.get("resolution")
        try:
            height, width = (int(v) for v in resolution)
        except (TypeError, ValueError) as err:
            raise UserError(f"model.resolution={resolution}: expected [height, width]") from err
        self.resolution = (height, width)

    @property
    def name(self) -> str:
        return str(self.preset.get("name", "custom"))

    @cached_property
    def vae(self):
        return build_vae(self.preset, self.device)

    @cached_property
    def audio_encoder(self):
        return build_audio_encoder(self.preset, self.device)

    @cached_property
    def text_encoder(self):
        return build_text_encoder(self.preset, self.device)

    def check(self, dit) -> None:
        """Refuse a preset whose VAE does not fit its DiT (``dit``: a ``DiTConfig``): the VAE's time factor must
        be the DiT's video frames per latent frame, and the resolution divisible by the VAE's and the patch's
        space factors."""
        vae = self.vae
        if vae.time_factor != dit.video_frames_per_latent:
            raise UserError(f"model={self.name}: the VAE's time factor {vae.time_factor} differs from "
                            f"model.dit.video_frames_per_latent={dit.video_frames_per_latent}")
        factor = vae.space_factor * dit.patch_size[1]
        height, width = self.resolution
        if height % factor or width % factor:
            raise UserError(f"model.resolution={height}x{width}: must be divisible by {factor} (VAE x patch)")
