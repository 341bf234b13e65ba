"""``infer.py``'s pipeline: load the parts a config names, stream blocks through an engine, decode each block
as it finishes and write it out, then report time to first frame, real-time factor and frames per second.

Every user mistake (a missing image, unreadable audio, a checkpoint that does not fit) becomes a
:class:`UserError` with one line that names the input; ``infer.py`` prints it and exits with status 2.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import atomic, media
from .engine.batch import StreamBatchEngine
from .engine.stream import EngineSettings, SequentialEngine, StreamCore
from .models import AvatarDiT, DiTConfig
from .models.audio import EnergyMelFeatures, Wav2Vec2Features, blocks_for, split_into_blocks
from .models.audio_stream import stream_blocks
from .models.checkpoint import CheckpointError
from .models.text import build_text_encoder, load_precomputed
from .models.vae import build_vae

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
    block_times: list[float] = field(default_factory=list)  # seconds from the start to each decoded block
    ranks: list[dict] = field(default_factory=list)         # TPP: per-rank compute/wait/send seconds

    @property
    def rtf(self) -> float:
        """Generation time over video duration (below 1: faster than real time)."""
        return self.generation_s / self.seconds_of_video

    @property
    def fps(self) -> float:
        return self.frames / self.generation_s

    def save(self, path: str | Path) -> None:
        """Write the figures as JSON (atomically)."""
        data = {**asdict(self), "path": str(self.path), "rtf": self.rtf, "fps": self.fps}
        atomic.write_json(path, data)

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


def warn(message: str) -> None:
    """One line on stderr for the user. Not ``logging``: under Hydra its records go to stdout and the run's log
    file. Under torchrun only rank 0 says it, instead of every rank that loads the model."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def load_model(cfg: DictConfig, preset: DiTConfig, device: torch.device, dtype: torch.dtype) -> AvatarDiT:
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
    raise UserError(f"engine={name}: expected one of {ENGINES}")


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
        context_noise=float(e.context_noise),
    )


def audio_feature_blocks(cfg: DictConfig, extractor, wav, fps: float, dit: DiTConfig, video_frames: int) -> list:
    """Per-block audio features ``[1, frames_per_block, per_latent, layers, feat]``: offline over the whole file, or
    with ``audio_features.streaming=true`` causally, the file fed in chunks as a live input would arrive."""
    opts = cfg.get("audio_features") or {}
    if not opts.get("streaming", False):
        features = extractor(wav, video_frames)
        return split_into_blocks(features, dit.frames_per_block, dit.video_frames_per_latent)
    lookback, chunk_s = float(opts.get("lookback_s", 2.0)), opts.get("chunk_s")
    if lookback < 0:
        raise UserError(f"audio_features.lookback_s={lookback}: must be >= 0")
    if chunk_s is not None and float(chunk_s) * 16000 < 1:
        raise UserError(f"audio_features.chunk_s={chunk_s}: must be at least one sample (1/16000 s)")
    chunk = None if chunk_s is None else int(float(chunk_s) * 16000)
    return stream_blocks(extractor, wav, fps, dit.frames_per_block, dit.video_frames_per_latent, lookback, chunk)


@dataclass
class Prepared:
    """Everything a run needs before the first block: model (None on a decode-only rank), VAE, reference latent
    ``[1, C, 1, h, w]``, text context ``[1, L, text_dim]``, audio, and the per-block audio features."""

    model: AvatarDiT | None
    dit: DiTConfig
    settings: EngineSettings
    vae: Any
    reference: torch.Tensor
    context: torch.Tensor
    wav: Any
    fps: float
    video_frames: int
    audio_blocks: list

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.reference.shape[1], self.reference.shape[3], self.reference.shape[4])


def prepare(cfg: DictConfig, with_model: bool = True, device: torch.device | None = None) -> Prepared:
    """Load the parts ``cfg`` names and read the inputs; every problem becomes a :class:`UserError`."""
    device, dtype = device or resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    torch.set_grad_enabled(False)
    try:
        settings = engine_settings(cfg)
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        dit = DiTConfig.from_dict(OmegaConf.to_container(cfg.model.dit, resolve=True))
    except (TypeError, ValueError) as err:
        raise UserError(f"model={cfg.model.name}: {err}") from err
    model = load_model(cfg, dit, device, dtype) if with_model else None
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
    if dit.has_audio:
        audio_blocks = audio_feature_blocks(cfg, load_audio_encoder(cfg, device), wav, fps, dit, video_frames)
    else:
        audio_blocks = [None] * blocks_for(video_frames, dit.frames_per_block, dit.video_frames_per_latent)
    return Prepared(model, dit, settings, vae, reference, context, wav, fps, video_frames, audio_blocks)


def new_core(prep: Prepared, cfg: DictConfig, lanes: int | None = None) -> StreamCore:
    try:
        return StreamCore(prep.model, prep.settings, prep.latent_shape, prep.context, prep.reference,
                          seed=int(cfg.seed), lanes=lanes)
    except ValueError as err:
        raise UserError(str(err)) from err


def write_stream(cfg: DictConfig, prep: Prepared, blocks) -> RunReport:
    """Decode ``(block, x0)`` pairs as they arrive, write them to ``output.path``, and time the run."""
    decoder = prep.vae.stream_decoder()
    out_path = Path(cfg.output.path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames_path = out_path.with_suffix(".frames.npy") if cfg.output.frames else None
    written, block_times = 0, []
    start = time.perf_counter()
    with media.VideoWriter(out_path, fps=prep.fps, audio=prep.wav, sample_rate=16000, frames_path=frames_path) as writer:
        for _, x0 in tqdm(blocks, total=len(prep.audio_blocks), unit="block", desc="generating"):
            frames = decoder.decode(x0)[0]  # [3, T, H, W]
            frames = frames.transpose(0, 1)[: prep.video_frames - written].float().cpu()
            writer.write(frames)
            written += frames.shape[0]
            block_times.append(time.perf_counter() - start)
    generation_s = time.perf_counter() - start
    report = RunReport(out_path, written, written / prep.fps, block_times[0] if block_times else generation_s,
                       generation_s, block_times)
    return report


def run(cfg: DictConfig) -> RunReport | None:
    """Generate a video for ``cfg`` (see ``conf/infer.yaml``) and return the measured figures (None on the
    ranks of a TPP run that do not write the output)."""
    if cfg.engine.name == "tpp":
        return run_tpp(cfg)
    prep = prepare(cfg)
    core = new_core(prep, cfg)
    try:
        engine = build_engine(cfg, core)
    except ValueError as err:
        raise UserError(str(err)) from err
    return write_stream(cfg, prep, engine.stream(prep.audio_blocks))


def run_tpp(cfg: DictConfig) -> RunReport | None:
    """This rank's part of a TPP run (launched by torchrun; see :mod:`liveavatar.engine.tpp`)."""
    import torch.distributed as dist

    from .engine import tpp

    if "RANK" not in os.environ:
        raise UserError("engine=tpp runs under torchrun: torchrun --nproc_per_node=N+1 infer.py engine=tpp ...")
    e = cfg.engine
    layout = tpp.Layout(len(cfg.denoise.steps), bool(e.decode_on_last))
    rank, world, device = tpp.init_process_group(float(e.timeout_s))
    watchdog = tpp.Watchdog(tpp.default_store(), rank, float(e.fault_poll_s))
    role = f"step {rank}" if layout.is_dit(rank) else "decode"
    if rank == layout.output_rank and layout.decode_on_last:
        role += "+decode"
    stats = tpp.RankStats(rank, role)
    channel = tpp.Channel(device, stats)
    try:
        if world != layout.world_size:
            raise UserError(f"engine=tpp with {layout.steps} steps needs {layout.world_size} ranks "
                            f"({layout.steps} DiT ranks{'' if layout.decode_on_last else ' + 1 decoding rank'}); "
                            f"torchrun started {world}")
        if device.type == "cpu":
            torch.set_num_threads(int(e.threads_per_rank))
        prep = prepare(cfg, with_model=layout.is_dit(rank), device=device)
        report = None
        options = tpp.StageOptions(float(e.heartbeat_s), e.simulate_forward_ms)
        if layout.is_dit(rank):
            try:
                stage = tpp.DiTStage(new_core(prep, cfg, lanes=1), rank, layout, channel, options)
            except ValueError as err:
                raise UserError(str(err)) from err
            feed = tpp.AudioFeed(prep.audio_blocks) if rank == 0 else None
            dist.barrier()
            start = time.perf_counter()
            blocks = stage.run(feed)
            if rank == layout.output_rank:
                report = write_stream(cfg, prep, blocks)
            else:
                for _ in blocks:
                    pass
        else:
            dist.barrier()
            start = time.perf_counter()
            report = write_stream(cfg, prep, tpp.receive_blocks(channel, layout.steps - 1))
        channel.flush()
        stats.compute_s = time.perf_counter() - start - stats.wait_s - stats.send_s
        tpp.publish_stats(stats)
        if rank == layout.output_rank:
            all_stats = tpp.collect_stats(world)
            print(tpp.stats_table(all_stats))
            report.ranks = [{**r.__dict__, "wait_share": r.wait_share} for r in all_stats]
        dist.barrier()
    except BaseException as err:
        if watchdog.peer_error is not None:
            raise tpp.PeerFailure(watchdog.peer_error) from err
        watchdog.report(err)
        raise
    finally:
        watchdog.stop()
    dist.destroy_process_group()
    return report
