"""Load once, stream many: :class:`LiveAvatarPipeline` holds a loaded DiT and its components (VAE, audio and text
encoders) and streams one request after another, each with a fresh engine core (KV cache, sink, noise) and a
fresh streaming VAE decoder::

    pipe = LiveAvatarPipeline.from_config(cfg)             # conf/infer.yaml, loaded once
    for index, frames in pipe.stream("ref.png", "talk.wav", "a woman speaking"):
        send(frames)                                         # [T, 3, H, W] float32 in [-1, 1], on the CPU
    for index, frames in pipe.stream(image_tensor, microphone_chunks(), prompt_embeddings):
        ...                                                  # live audio: features computed as chunks arrive

``infer.py`` (engines ``sequential`` and ``stream_batch``) and the toy bench stream through it; TPP, one step per
rank, prepares its inputs with the request helpers below (:func:`read_image`, :func:`read_waveform`,
:func:`prompt_context`, :func:`feature_blocks`, :func:`decode_blocks`). Every user mistake becomes a one-line
:class:`~liveavatar.components.UserError`.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import media
from .components import SAMPLE_RATE, Components, UserError, frames_in, resolve_device, resolve_dtype
from .engine.batch import StreamBatchEngine
from .engine.stream import EngineSettings, SequentialEngine, StreamCore
from .models import AvatarDiT, DiTConfig
from .models.audio import blocks_for, split_into_blocks, split_video_frames
from .models.audio_stream import StreamingAudioFeatures
from .models.checkpoint import CheckpointError
from .models.interaction import read_speaking_labels, speaking_from_voices, talk_listen_features
from .models.lora import merge_lora
from .models.text import load_precomputed

ENGINES = ("sequential", "stream_batch")  # one device; tpp runs under torchrun (liveavatar.inference.run_tpp)


def warn(message: str) -> None:
    """One line on stderr for the user. Not ``logging``: under Hydra its records go to stdout and the run's log
    file. Under torchrun only rank 0 says it, instead of every rank that loads the model."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ settings


def engine_settings(cfg: DictConfig) -> EngineSettings:
    """The engine's settings: ``engine.*`` and ``denoise.*``, and the attention window and RoPE policy the model
    config shares with training (``model.window_blocks``, ``model.rope.*``)."""
    e, m = cfg.engine, cfg.model
    rope = m.get("rope") or {}
    return EngineSettings(
        steps=[float(s) for s in cfg.denoise.steps], shift=float(cfg.denoise.shift), sink=e.sink,
        keep_first_block=bool(e.keep_first_block), sink_switch_block=e.sink_switch_block, history=e.history,
        window_blocks=int(m.get("window_blocks", 3)), rope_policy=rope.get("policy", "rolling"),
        rapr_distance=int(rope.get("max_distance", 10)), rolling_offset=rope.get("rolling_offset"),
        context_noise=float(e.context_noise), sink_motion=bool(m.get("sink_motion", False)),
    )


@torch.no_grad()
def still_motion_latents(vae, pixels: torch.Tensor, dit: DiTConfig, settings: EngineSettings) -> torch.Tensor | None:
    """The sink's motion latents (``model.sink_motion``), as Live Avatar's release makes them: the reference image
    ``[1, 3, 1, H, W]`` held still for ``motion_video_frames`` video frames, VAE-encoded ``[1, C, K, h, w]``; None
    when the model's sink has no motion tokens."""
    if not settings.sink_motion:
        return None
    return vae.encode(pixels.expand(-1, -1, dit.motion_video_frames, -1, -1).contiguous())


def dit_config(cfg: DictConfig) -> DiTConfig:
    try:
        return DiTConfig.from_dict(OmegaConf.to_container(cfg.model.dit, resolve=True))
    except (TypeError, ValueError) as err:
        raise UserError(f"model={cfg.model.name}: {err}") from err


def load_model(cfg: DictConfig, preset: DiTConfig, device: torch.device, dtype: torch.dtype) -> AvatarDiT:
    """``checkpoint`` into the preset's architecture, or (``checkpoint=null``) random weights seeded by ``seed``."""
    if cfg.checkpoint:
        try:
            model = AvatarDiT.from_pretrained(cfg.checkpoint, config=preset, dtype=dtype, device=device)
        except CheckpointError as err:
            raise UserError(f"checkpoint={cfg.checkpoint}: {err} (model={cfg.model.name})") from err
        if model.initialised_modules:
            warn(f"checkpoint={cfg.checkpoint} has no {', '.join(model.initialised_modules)}: "
                 "they start at zero output")
    else:
        warn(f"checkpoint=null: streaming an untrained model with random weights of the {cfg.model.name} preset; "
             "its output is noise")
        torch.manual_seed(cfg.seed)
        model = AvatarDiT(preset).to(device=device, dtype=dtype)
    if cfg.get("lora"):
        alpha = (cfg.model.get("lora") or {}).get("alpha")
        try:
            merged = merge_lora(model, cfg.lora, alpha=alpha, strength=float(cfg.get("lora_strength", 1.0)))
        except CheckpointError as err:
            raise UserError(f"lora={cfg.lora}: {err} (model={cfg.model.name})") from err
        print(f"lora={cfg.lora}: merged into {merged['modules']} linear layers (rank {merged['rank']})")
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class AudioFeatureOptions:
    """How a whole waveform becomes per-block features (``audio_features.*``). ``streaming``: causally, block by
    block, the waveform fed in chunks of ``chunk_s`` seconds (None: one block) as a live input would arrive,
    each block seeing ``lookback_s`` seconds of past audio; otherwise one pass over the whole waveform. A live
    source (an iterable of chunks) is always causal."""

    streaming: bool = False
    lookback_s: float = 2.0
    chunk_s: float | None = None

    def __post_init__(self):
        if not self.lookback_s >= 0:
            raise UserError(f"audio_features.lookback_s={self.lookback_s}: must be >= 0")
        if self.chunk_s is not None and not self.chunk_s * SAMPLE_RATE >= 1:
            raise UserError(f"audio_features.chunk_s={self.chunk_s}: must be at least one sample (1/{SAMPLE_RATE} s)")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "AudioFeatureOptions":
        opts = cfg.get("audio_features") or {}
        chunk_s = opts.get("chunk_s")
        return cls(bool(opts.get("streaming", False)), float(opts.get("lookback_s", 2.0)),
                   None if chunk_s is None else float(chunk_s))

    @property
    def chunk_samples(self) -> int | None:
        return None if self.chunk_s is None else int(self.chunk_s * SAMPLE_RATE)


# ------------------------------------------------------------------------------------------------ requests


def read_image(source: str | os.PathLike | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A reference image (a file, or a ``[3, h, w]`` tensor in [-1, 1]) -> ``[3, H, W]`` float32 at ``size``
    (centre-cropped to its aspect ratio, then resized, as :func:`liveavatar.media.read_image` does)."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or source.shape[0] != 3 or not source.is_floating_point():
            raise UserError(f"image: expected a float tensor [3, H, W] in [-1, 1], got {source.dtype} "
                            f"{list(source.shape)}")
        return media.resize_crop(source.detach().float().cpu(), size)
    try:
        return media.read_image(source, size=size)
    except media.MediaError as err:
        raise UserError(str(err)) from err


def _as_samples(chunk: Any, what: str) -> np.ndarray:
    """Mono audio (numpy, tensor or sequence) -> float32 numpy ``[samples]``."""
    if isinstance(chunk, torch.Tensor):
        chunk = chunk.detach().float().cpu().numpy()
    samples = np.asarray(chunk, dtype=np.float32)
    if samples.ndim != 1:
        raise UserError(f"{what}: expected mono samples [n] at {SAMPLE_RATE} Hz, got shape {list(samples.shape)}")
    return samples


def read_waveform(source: str | os.PathLike | np.ndarray | torch.Tensor, max_seconds: float | None = None
                  ) -> np.ndarray:
    """A whole recording (an audio or video file, any rate and channel count; or mono samples at
    :data:`~liveavatar.components.SAMPLE_RATE`) -> float32 ``[samples]``, cut to ``max_seconds``."""
    if isinstance(source, (str, os.PathLike)):
        try:
            wav = media.read_audio(source, sample_rate=SAMPLE_RATE)
        except media.MediaError as err:
            raise UserError(str(err)) from err
    else:
        wav = _as_samples(source, "audio")
    return wav if max_seconds is None else wav[: int(float(max_seconds) * SAMPLE_RATE)]


def prompt_context(prompt: str | os.PathLike | torch.Tensor, components: Components, dit: DiTConfig,
                   device: torch.device) -> torch.Tensor:
    """``[1, L, text_dim]`` text context of a prompt: text (the preset's text encoder), a path to precomputed
    embeddings (``.safetensors``/``.pt`` of ``[1, L, text_dim]``) or such a tensor (``[1, L, D]`` or ``[L, D]``)."""
    if isinstance(prompt, torch.Tensor):
        context, name = (prompt if prompt.dim() == 3 else prompt[None])[:1], "prompt"
    elif isinstance(prompt, os.PathLike):
        name = f"prompt_embedding={os.fspath(prompt)}"
        try:
            context = load_precomputed(prompt)[:1]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"prompt: {err}") from err
    else:
        encoder = components.text_encoder
        try:
            context, _ = encoder([str(prompt)])
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"prompt: {err}") from err
        name = "prompt"
    if context.dim() != 3 or context.shape[-1] != dit.text_dim:
        raise UserError(f"{name}: width {context.shape[-1]}, the model needs {dit.text_dim}")
    return context[:, : dit.text_len].to(device)


def feature_blocks(extractor, wav: np.ndarray, video_frames: int, fps: float, dit: DiTConfig,
                   options: AudioFeatureOptions, listen: np.ndarray | None = None,
                   speaking: np.ndarray | None = None) -> Iterator[torch.Tensor | None]:
    """Per-block audio features ``[1, frames_per_block, per_latent, layers, feat]`` of a whole waveform: one pass
    over all of it now, or (``options.streaming``) causally, chunk by chunk as the engine asks for blocks. None
    per block for a DiT without audio. A listening model (``model.dit.listening``) takes the two streams of
    :func:`~liveavatar.models.interaction.talk_listen_features`: ``wav`` masked by ``speaking`` (``[video_frames]``,
    default all speaking) and ``listen`` (the interlocutor's voice; default ``wav``, one mixed recording) by its
    complement."""
    fpb, per_latent = dit.frames_per_block, dit.video_frames_per_latent
    if not dit.has_audio:
        return iter([None] * blocks_for(video_frames, fpb, per_latent))
    if dit.listening:
        if options.streaming:
            raise UserError("audio_features.streaming=true is not built for listening models yet (two live streams); "
                            "use the whole-file features")
        talk = extractor(wav, video_frames)
        other = talk if listen is None else extractor(_fit_length(listen, len(wav)), video_frames)
        mask = torch.ones(video_frames) if speaking is None else torch.from_numpy(np.asarray(speaking, np.float32))
        return iter(split_into_blocks(talk_listen_features(talk, other, mask), fpb, per_latent))
    s2v = dit.family == "s2v"  # latent frame j pairs with video frames 4j.. (no first frame alone)
    if not options.streaming and s2v:
        return iter(split_video_frames(extractor(wav, video_frames), fpb, per_latent,
                                       blocks_for(video_frames, fpb, per_latent)))
    if not options.streaming:
        return iter(split_into_blocks(extractor(wav, video_frames), fpb, per_latent))
    stream = StreamingAudioFeatures(extractor, fps, fpb, per_latent, options.lookback_s, SAMPLE_RATE,
                                    first_frame_alone=not s2v)
    chunk = options.chunk_samples or max(1, math.ceil(stream.block_seconds * SAMPLE_RATE))
    return _causal(stream, (wav[i : i + chunk] for i in range(0, len(wav), chunk)))


def _fit_length(wav: np.ndarray, samples: int) -> np.ndarray:
    """``wav`` cut or zero-padded to ``samples`` (the interlocutor's voice follows the avatar's timeline)."""
    return wav[:samples] if len(wav) >= samples else np.pad(wav, (0, samples - len(wav)))


def speaking_mask(dit: DiTConfig, wav: np.ndarray, listen: np.ndarray | None,
                  labels: str | os.PathLike | np.ndarray | None, video_frames: int, fps: float) -> np.ndarray | None:
    """The speaking mask ``[video_frames]`` of a request to a listening model (see
    :mod:`liveavatar.models.interaction`): the labels (a file, or one value per frame) when given, else from the
    two voices' energies when ``listen`` is a separate voice, else None (all speaking). Another model refuses a
    second voice or labels."""
    labelled = isinstance(labels, np.ndarray) or bool(labels)
    if not dit.listening:
        if listen is not None or labelled:
            raise UserError("listen_audio= and audio_mask= feed a listening model (model.dit.listening=true); this "
                            "model takes one voice")
        return None
    if isinstance(labels, np.ndarray):
        if len(labels) < video_frames:
            raise UserError(f"audio_mask: {len(labels)} labels for {video_frames} video frames")
        return labels[:video_frames].astype(bool)
    if labels:
        try:
            return read_speaking_labels(labels, video_frames, fps)
        except ValueError as err:
            raise UserError(str(err)) from err
    if listen is not None:
        return speaking_from_voices(wav, _fit_length(listen, len(wav)), video_frames, fps, SAMPLE_RATE)
    return None


def _causal(stream: StreamingAudioFeatures, chunks: Iterable[np.ndarray], on_end: Callable[[int], None] | None = None
            ) -> Iterator[torch.Tensor]:
    """Push ``chunks`` through ``stream`` and yield each block's features as soon as its audio is complete; at the
    end, ``on_end(video frames covered)`` is called before the last (padded) blocks are yielded."""
    for chunk in chunks:
        yield from stream.push(chunk)
    tail = stream.flush()
    if on_end is not None:
        on_end(stream.frames_in(stream.received))
    yield from tail


class _Silence:
    """The block clock of a DiT without audio: features of no width, so :class:`StreamingAudioFeatures` still
    counts the blocks that live audio covers."""

    device = torch.device("cpu")

    def __call__(self, wav, frames: int) -> torch.Tensor:
        return torch.zeros(1, frames, 0, 0)


class StreamBlock(NamedTuple):
    """One finished block: its index and its decoded frames ``[T, 3, H, W]``, float32 in [-1, 1], on the CPU
    (``T``: the block's video frames, fewer for the last block when the audio ends inside it)."""

    index: int
    frames: torch.Tensor


def decode_blocks(vae, blocks: Iterable[tuple[int, torch.Tensor]],
                  video_frames: int | Callable[[], int | None] | None = None) -> Iterator[StreamBlock]:
    """Decode ``(block, x0 [1, C, F, h, w])`` pairs with one streaming VAE decoder as they arrive. The padding
    past ``video_frames`` (the frames the audio covers; a callable when that becomes known only once a live
    source ends, returning None until then) is cut."""
    decoder = vae.stream_decoder()
    written = 0
    for index, x0 in blocks:
        frames = decoder.decode(x0)[0].transpose(0, 1)  # [T, 3, H, W]
        total = video_frames() if callable(video_frames) else video_frames
        if total is not None:
            frames = frames[: max(0, total - written)]
        frames = frames.float().cpu()
        written += frames.shape[0]
        yield StreamBlock(index, frames)


class AvatarStream:
    """One request's video, block by block: iterate it (once) for :class:`StreamBlock` ``(index, frames)``.

    ``fps`` and ``sample_rate`` of the output; ``audio``: the driving waveform ``[samples]`` when it was given
    whole (a file or an array; None for a live source); ``blocks``: how many blocks will come (None for a live
    source); ``video_frames``: the frames the audio covers (None for a live source until its audio ends).
    """

    def __init__(self, blocks: Iterator[StreamBlock], fps: float, audio: np.ndarray | None, total: int | None,
                 video_frames: Callable[[], int | None]):
        self._blocks, self.fps, self.audio, self.blocks = blocks, fps, audio, total
        self._video_frames = video_frames
        self.sample_rate = SAMPLE_RATE

    @property
    def video_frames(self) -> int | None:
        return self._video_frames()

    def __iter__(self) -> "AvatarStream":
        return self

    def __next__(self) -> StreamBlock:
        with torch.no_grad():  # per step: a generator must not leave grad mode switched off in its caller
            return next(self._blocks)


# ------------------------------------------------------------------------------------------------ pipeline


def _check_engine(name: str) -> None:
    if name not in ENGINES:
        raise UserError(f"engine={name}: expected one of {', '.join(ENGINES)} "
                        "(tpp runs under torchrun: infer.py engine=tpp)")


class LiveAvatarPipeline:
    """A loaded model that streams avatar videos, one request after another.

    Args:
        model: the DiT (eval mode, on its device and dtype).
        components: the preset's VAE and encoders (:class:`~liveavatar.components.Components`); must fit ``model``.
        settings: the engine's settings (steps, shift, sink, history, window, RoPE policy).
        engine: ``sequential`` or ``stream_batch``.
        seed: the noise seed of a request that names none.
        prompt: the prompt of a request that names none (text, an embeddings file path or tensor).
        audio_options: how whole waveforms become features (``audio_features.*``).
    """

    def __init__(self, model: AvatarDiT, components: Components, settings: EngineSettings, *,
                 engine: str = "sequential", seed: int = 0, prompt: str | os.PathLike | torch.Tensor = "",
                 audio_options: AudioFeatureOptions = AudioFeatureOptions()):
        _check_engine(engine)
        param = next(model.parameters())
        self.model, self.dit, self.components, self.settings = model, model.config, components, settings
        self.device, self.dtype = param.device, param.dtype
        self.engine, self.seed, self.prompt, self.audio_options = engine, int(seed), prompt, audio_options
        components.check(self.dit)
        # Built now, not at the first request: a missing wav2vec2 folder is a loading error.
        self.audio_encoder = components.audio_encoder if self.dit.has_audio else None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "LiveAvatarPipeline":
        """Load what ``cfg`` (``conf/infer.yaml``) names: device, dtype, DiT and checkpoint, VAE and encoders.
        ``prompt_embedding`` (or ``prompt``), ``seed`` and ``audio_features.*`` become the request defaults."""
        device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
        try:
            settings = engine_settings(cfg)
        except ValueError as err:
            raise UserError(str(err)) from err
        _check_engine(cfg.engine.name)  # before the (slow) model load
        dit = dit_config(cfg)
        model = load_model(cfg, dit, device, dtype)
        prompt = Path(cfg.prompt_embedding) if cfg.get("prompt_embedding") else str(cfg.prompt)
        return cls(model, Components(cfg.model, device), settings, engine=cfg.engine.name, seed=int(cfg.seed),
                   prompt=prompt, audio_options=AudioFeatureOptions.from_config(cfg))

    @property
    def fps(self) -> float:
        return self.components.fps

    @torch.no_grad()
    def reference_latent(self, image: str | os.PathLike | torch.Tensor) -> torch.Tensor:
        """``[1, C, 1, h, w]``: the reference image encoded by the VAE, in the model's dtype."""
        pixels = read_image(image, self.components.resolution)
        return self.components.vae.encode(pixels[None, :, None].to(self.device)).to(self.dtype)

    @torch.no_grad()
    def text_context(self, prompt: str | os.PathLike | torch.Tensor | None = None) -> torch.Tensor:
        """``[1, L, text_dim]`` for ``prompt`` (None: the pipeline's default prompt)."""
        return prompt_context(self.prompt if prompt is None else prompt, self.components, self.dit, self.device)

    @torch.no_grad()
    def stream(self, image: str | os.PathLike | torch.Tensor, audio: Any, prompt: Any = None, *,
               seed: int | None = None, max_seconds: float | None = None, listen_audio: Any = None,
               audio_mask: str | os.PathLike | np.ndarray | None = None) -> AvatarStream:
        """Start one request and return its :class:`AvatarStream` of decoded blocks.

        Args:
            image: the reference, a file or a ``[3, H, W]`` tensor in [-1, 1] (resized to ``model.resolution``).
            audio: a file (any format, rate and channel count), a whole mono waveform at 16 kHz (numpy or tensor),
                or an iterable of such waveform chunks, consumed as the stream goes (live input: features are
                computed causally, block by block, as the chunks arrive).
            prompt: text, a path (``os.PathLike``) of precomputed embeddings, or an embeddings tensor; None: the
                pipeline's default.
            seed: the noise seed (None: the pipeline's).
            max_seconds: use only this much audio.
            listen_audio: a listening model's interlocutor voice (a file or a whole waveform), on the avatar's
                timeline; None: ``audio`` is one mixed recording of both.
            audio_mask: speaking labels: a file (:func:`~liveavatar.models.interaction.read_speaking_labels`) or one
                0/1 per video frame; None: from the two voices when ``listen_audio`` is given, else all speaking.

        The inputs are read, the reference and prompt encoded and the engine built before this returns, so a bad
        input raises :class:`~liveavatar.components.UserError` here; a live source's mistakes (a chunk of the
        wrong shape, audio shorter than one frame) surface while iterating.
        """
        # Files first, so that a missing one is reported before a large text encoder is loaded.
        pixels = read_image(image, self.components.resolution)
        whole = isinstance(audio, (str, os.PathLike, np.ndarray, torch.Tensor))
        wav = read_waveform(audio, max_seconds) if whole else None
        reference = self.reference_latent(pixels)
        motion = still_motion_latents(self.components.vae, pixels[None, :, None].to(self.device), self.dit, self.settings)
        context = self.text_context(prompt)
        listen = None if listen_audio is None else read_waveform(listen_audio, max_seconds)
        if whole:
            audio_blocks, total, video_frames = self._whole_blocks(wav, audio, listen, audio_mask)
        elif listen is not None or audio_mask is not None or self.dit.listening:
            raise UserError("a listening model (listen_audio=, audio_mask=) takes whole recordings for now, not a "
                            "live source")
        else:
            total = None
            audio_blocks, video_frames = self._live_blocks(audio, max_seconds)
        core = self._core(reference, context, self.seed if seed is None else int(seed), motion)
        engine = SequentialEngine(core) if self.engine == "sequential" else self._batch_engine(core)
        blocks = decode_blocks(self.components.vae, engine.stream(audio_blocks), video_frames)
        return AvatarStream(blocks, self.fps, wav, total, video_frames)

    def _whole_blocks(self, wav: np.ndarray, source: Any, listen: np.ndarray | None = None,
                      audio_mask: str | os.PathLike | None = None):
        """Features of a whole waveform (and a listening model's other voice) -> (block features iterator, number
        of blocks, video frames)."""
        video_frames = frames_in(len(wav), self.fps)
        if video_frames < 1:
            name = f"audio={os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "audio"
            raise UserError(f"{name}: shorter than one video frame")
        speaking = speaking_mask(self.dit, wav, listen, audio_mask, video_frames, self.fps)
        blocks = feature_blocks(self.audio_encoder, wav, video_frames, self.fps, self.dit, self.audio_options,
                                listen, speaking)
        total = blocks_for(video_frames, self.dit.frames_per_block, self.dit.video_frames_per_latent)
        return blocks, total, lambda: video_frames

    def _core(self, reference: torch.Tensor, context: torch.Tensor, seed: int,
              motion: torch.Tensor | None = None) -> StreamCore:
        latent_shape = (reference.shape[1], reference.shape[3], reference.shape[4])
        try:
            return StreamCore(self.model, self.settings, latent_shape, context, reference, seed=seed,
                              sink_motion=None if motion is None else motion.to(self.dtype))
        except ValueError as err:
            raise UserError(str(err)) from err

    @staticmethod
    def _batch_engine(core: StreamCore) -> StreamBatchEngine:
        try:
            return StreamBatchEngine(core)
        except ValueError as err:
            raise UserError(str(err)) from err

    def _live_blocks(self, chunks: Iterable, max_seconds: float | None):
        """Causal features of a live source -> (block features iterator, video frames once known)."""
        return live_feature_blocks(self.audio_encoder, chunks, self.fps, self.dit, self.audio_options, max_seconds)


def live_feature_blocks(extractor, chunks: Iterable, fps: float, dit: DiTConfig, options: AudioFeatureOptions,
                        max_seconds: float | None = None) -> tuple[Iterator[torch.Tensor | None], Callable[[], int | None]]:
    """Per-block features of a live source (an iterable of mono 16 kHz chunks, consumed as blocks are asked for),
    computed causally (``options.lookback_s`` of past audio with each block), as
    :meth:`LiveAvatarPipeline.stream` and a TPP group's rank 0 take them. Returns the iterator (None per block for
    a DiT without audio; ``extractor`` may then be None) and a callable giving the video frames the audio covered
    once the source has ended (None before)."""
    extractor = extractor if dit.has_audio else _Silence()
    stream = StreamingAudioFeatures(extractor, fps, dit.frames_per_block, dit.video_frames_per_latent,
                                    options.lookback_s, SAMPLE_RATE, first_frame_alone=dit.family != "s2v")
    limit = None if max_seconds is None else int(float(max_seconds) * SAMPLE_RATE)
    ended: dict[str, int] = {}

    def take() -> Iterator[np.ndarray]:
        taken = 0
        for chunk in chunks:
            samples = _as_samples(chunk, "audio chunk")
            if limit is not None:
                samples = samples[: limit - taken]
            taken += len(samples)
            yield samples
            if limit is not None and taken >= limit:
                return

    def on_end(frames: int) -> None:
        if frames < 1:
            raise UserError("audio: the live source ended before one video frame")
        ended["frames"] = frames

    blocks = _causal(stream, take(), on_end)
    if not dit.has_audio:
        blocks = (None for _ in blocks)
    return blocks, lambda: ended.get("frames")

