"""``infer.py``'s pipeline: load the parts a config names, stream blocks through an engine, decode each block
as it finishes and write it out, then report time to first frame, real-time factor and frames per second.

Every user mistake (a missing image, unreadable audio, a checkpoint that does not fit) becomes a
:class:`UserError` with one line that names the input; ``infer.py`` prints it and exits with status 2.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import media
from .engine.batch import StreamBatchEngine
from .engine.stream import EngineSettings, SequentialEngine, StreamCore
from .models import AvatarDiT, DiTConfig
from .models.audio import EnergyMelFeatures, Wav2Vec2Features, group_by_latent_frame, latent_frames_for
from .models.checkpoint import CheckpointError
from .models.text import build_text_encoder, load_precomputed
from .models.vae import build_vae

log = logging.getLogger(__name__)
ENGINES = ("sequential", "stream_batch", "tpp")


class UserError(Exception):
    """A bad input or setting: its message is one line for the user."""


@dataclass
class RunReport:
    path: Path
    frames: int
    seconds_of_video: float
    first_frame_s: float
    generation_s: float

    @property
    def rtf(self) -> float:
        """Generation time over video duration (below 1: faster than real time)."""
        return self.generation_s / self.seconds_of_video

    @property
    def fps(self) -> float:
        return self.frames / self.generation_s

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.frames} frames, {self.seconds_of_video:.2f} s): time to first frame "
                f"{self.first_frame_s:.2f} s, real-time factor {self.rtf:.2f}, {self.fps:.1f} frames/s")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"dtype={name}: not a floating-point torch dtype (float32, bfloat16, float16)")
    return dtype


def load_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> AvatarDiT:
    try:
        preset = DiTConfig.from_dict(OmegaConf.to_container(cfg.model.dit, resolve=True))
    except (TypeError, ValueError) as err:
        raise UserError(f"model={cfg.model.name}: {err}") from err
    if cfg.checkpoint:
        try:
            model = AvatarDiT.from_pretrained(cfg.checkpoint, config=preset, dtype=dtype, device=device)
        except CheckpointError as err:
            raise UserError(f"checkpoint={cfg.checkpoint}: {err} (model={cfg.model.name})") from err
        if model.initialised_modules:
            log.warning("checkpoint has no %s: they start at zero output", ", ".join(model.initialised_modules))
    else:
        log.warning("checkpoint=null: random weights of the %s preset (the output is noise)", cfg.model.name)
        torch.manual_seed(cfg.seed)
        model = AvatarDiT(preset).to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_audio_encoder(cfg: DictConfig, device: torch.device):
    enc = cfg.model.audio_encoder
    if enc.kind == "energy_mel":
        return EnergyMelFeatures(n_mels=enc.n_mels)
    if enc.kind == "wav2vec2":
        if not enc.path:
            raise UserError("model.audio_encoder.path: the wav2vec2 preset needs a local wav2vec2 folder")
        try:
            return Wav2Vec2Features(enc.path, device=device)
        except (OSError, ValueError) as err:
            raise UserError(f"model.audio_encoder.path={enc.path}: {err}") from err
    raise UserError(f"model.audio_encoder.kind={enc.kind}: expected energy_mel or wav2vec2")


def text_context(cfg: DictConfig, dit: DiTConfig, device: torch.device) -> torch.Tensor:
    """``[1, L, text_dim]`` embeddings of the prompt (or the precomputed file)."""
    try:
        if cfg.prompt_embedding:
            context = load_precomputed(cfg.prompt_embedding)[:1]
        else:
            enc = cfg.model.text_encoder
            encoder = build_text_encoder(enc.kind, enc.path, dit.text_dim, dit.text_len, device, torch.float32)
            context, _ = encoder([str(cfg.prompt)])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"prompt: {err}") from err
    if context.shape[-1] != dit.text_dim:
        raise UserError(f"prompt_embedding={cfg.prompt_embedding}: width {context.shape[-1]}, the model needs {dit.text_dim}")
    return context[:, : dit.text_len].to(device)


def build_engine(cfg: DictConfig, core: StreamCore):
    name = cfg.engine.name
    if name == "sequential":
        return SequentialEngine(core)
    if name == "stream_batch":
        return StreamBatchEngine(core)
    if name == "tpp":
        raise UserError("engine=tpp runs under torchrun (see the README)")
    raise UserError(f"engine={name}: expected one of {ENGINES}")


def engine_settings(cfg: DictConfig) -> EngineSettings:
    e = cfg.engine
    return EngineSettings(
        steps=[float(s) for s in cfg.denoise.steps], shift=float(cfg.denoise.shift), sink=e.sink,
        keep_first_block=bool(e.keep_first_block), sink_switch_block=e.sink_switch_block, history=e.history,
        window_blocks=int(e.window_blocks), rope_policy=cfg.model.rope.policy,
        rapr_distance=int(cfg.model.rope.max_distance), context_noise=float(e.context_noise),
    )


def run(cfg: DictConfig) -> RunReport:
    """Generate a video for ``cfg`` (see ``conf/infer.yaml``) and return the measured figures."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    torch.set_grad_enabled(False)
    try:
        settings = engine_settings(cfg)
    except ValueError as err:
        raise UserError(str(err)) from err
    model = load_model(cfg, device, dtype)
    dit = model.config
    height, width = (int(v) for v in cfg.model.resolution)
    fps = float(cfg.model.fps)

    try:
        vae_kwargs = dict(OmegaConf.to_container(cfg.model.vae, resolve=True))
        kind, path = vae_kwargs.pop("kind"), vae_kwargs.pop("path", None)
        vae = build_vae(kind, path, **({"device": device} if kind == "wan" else vae_kwargs))
    except (OSError, ValueError) as err:
        raise UserError(f"model.vae: {err}") from err
    if vae.time_factor != dit.video_frames_per_latent:
        raise UserError(f"model={cfg.model.name}: the VAE's time factor {vae.time_factor} differs from "
                        f"model.dit.video_frames_per_latent={dit.video_frames_per_latent}")
    factor = vae.space_factor * dit.patch_size[1]
    if height % factor or width % factor:
        raise UserError(f"model.resolution={height}x{width}: must be divisible by {factor} (VAE x patch)")

    try:
        image = media.read_image(cfg.image, size=(height, width))
        wav = media.read_audio(cfg.audio, sample_rate=16000)
    except media.MediaError as err:
        raise UserError(str(err)) from err
    if cfg.max_seconds is not None:
        wav = wav[: int(float(cfg.max_seconds) * 16000)]
    video_frames = int(len(wav) * fps // 16000)
    if video_frames < 1:
        raise UserError(f"audio={cfg.audio}: shorter than one video frame")

    reference = vae.encode(image[None, :, None].to(device)).to(dtype)  # [1, C, 1, h, w]
    context = text_context(cfg, dit, device)
    features = load_audio_encoder(cfg, device)(wav, video_frames)
    latent_frames = latent_frames_for(video_frames, dit.video_frames_per_latent)
    per_block = dit.frames_per_block
    blocks = math.ceil(latent_frames / per_block)
    grouped = group_by_latent_frame(features, blocks * per_block, dit.video_frames_per_latent)
    audio_blocks = [grouped[:, b * per_block : (b + 1) * per_block] for b in range(blocks)] if dit.has_audio else [None] * blocks

    try:
        core = StreamCore(model, settings, tuple(reference.shape[1:2]) + tuple(reference.shape[3:]), context,
                          reference, seed=int(cfg.seed))
        engine = build_engine(cfg, core)
    except ValueError as err:
        raise UserError(str(err)) from err
    decoder = vae.stream_decoder()
    out_path = Path(cfg.output.path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames_path = out_path.with_suffix(".frames.npy") if cfg.output.frames else None

    written, first_frame_s = 0, None
    start = time.perf_counter()
    with media.VideoWriter(out_path, fps=fps, audio=wav, sample_rate=16000, frames_path=frames_path) as writer:
        for _, x0 in tqdm(engine.stream(audio_blocks), total=blocks, unit="block", desc="generating"):
            frames = decoder.decode(x0)[0]  # [3, T, H, W]
            frames = frames.transpose(0, 1)[: video_frames - written].float().cpu()
            writer.write(frames)
            written += frames.shape[0]
            if first_frame_s is None:
                first_frame_s = time.perf_counter() - start
    generation_s = time.perf_counter() - start
    return RunReport(out_path, written, written / fps, first_frame_s or generation_s, generation_s)
