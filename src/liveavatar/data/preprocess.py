"""Real talking-head videos -> training shards:
``python -m liveavatar.data.preprocess videos=DIR out=DIR [model=tiny] [data.clip_latent_frames=6] ...``

For every video under ``videos`` (searched recursively; ``.mp4 .mov .mkv .webm .avi``, with an optional caption
``same_stem.txt`` next to it), the frames are resampled to ``model.fps`` (for each output time, the decoded frame
nearest to it), center-cropped and resized to ``model.resolution``, and cut into non-overlapping windows of
``vae.video_frames(data.clip_latent_frames)`` frames (``1 + 4 (F - 1)`` for Wan's VAE). Each window becomes one
sample (format: :mod:`liveavatar.data.shards`): its VAE latents, the latent of a reference frame of the same video,
the audio features of its frames, and the caption's text embedding (``data.default_prompt`` without a caption).

A clip that cannot be used (corrupt, no audio track, too short, unreadable caption) is skipped and listed with
its reason in the manifest and at the end of the run. Configuration: ``conf/preprocess.yaml``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import media
from ..components import SAMPLE_RATE, Components, UserError, frames_in, resolve_device
from ..models.config import DiTConfig
from . import shards

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
REFERENCE_CHOICES = "first, last or a frame index >= 0"
AUDIO_CONTEXTS = ("clip", "window")


class SkipVideo(Exception):
    """This video cannot be used; the message is the one-line reason."""


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """How videos become samples.

    Args:
        fps: video frames per second of the samples (the model's).
        size: ``(H, W)`` of the video frames (the model's resolution).
        latent_frames: latent frames ``F`` per sample.
        shard_size: most samples per shard.
        reference_frame: ``"first"``, ``"last"`` or the index (at ``fps``) of the frame whose latent is the reference.
        default_prompt: the caption of videos without a ``.txt``.
        audio_context: ``"clip"``: features of the whole clip's audio, cut per window (how ``infer.py`` computes
            them, so training sees the features inference will); ``"window"``: features of each window's audio alone.
        sink_motion_frames: with ``n > 0`` each sample also holds ``sink_motion``, the latents of its reference frame
            held still for ``n`` video frames (``model.sink_motion``: the sink's FramePack motion tokens).
    """

    fps: float
    size: tuple[int, int]
    latent_frames: int
    shard_size: int = 256
    reference_frame: str | int = "first"
    default_prompt: str = "a person talking to the camera"
    audio_context: str = "clip"
    sink_motion_frames: int = 0

    def __post_init__(self):
        if self.fps <= 0:
            raise ValueError(f"fps={self.fps}: must be positive")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"resolution {list(self.size)}: expected [height, width], both positive")
        if self.latent_frames < 1:
            raise ValueError(f"data.clip_latent_frames={self.latent_frames}: must be >= 1")
        if self.shard_size < 1:
            raise ValueError(f"data.shard_size={self.shard_size}: must be >= 1")
        ref = self.reference_frame
        if not (ref in ("first", "last") or (isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0)):
            raise ValueError(f"data.reference_frame={ref}: expected {REFERENCE_CHOICES}")
        if self.sink_motion_frames < 0:
            raise ValueError(f"sink_motion_frames={self.sink_motion_frames}: must not be negative")
        if self.audio_context not in AUDIO_CONTEXTS:
            raise ValueError(f"data.audio_context={self.audio_context}: expected one of {', '.join(AUDIO_CONTEXTS)}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Settings":
        d = cfg.data
        ref = d.reference_frame
        if isinstance(ref, str) and ref.strip().isdigit():
            ref = int(ref)
        return cls(fps=float(cfg.model.fps), size=tuple(int(v) for v in cfg.model.resolution),
                   latent_frames=int(d.clip_latent_frames), shard_size=int(d.shard_size), reference_frame=ref,
                   default_prompt=str(d.default_prompt), audio_context=str(d.audio_context),
                   sink_motion_frames=int(cfg.model.dit.get("motion_video_frames", DiTConfig.motion_video_frames)) if cfg.model.get("sink_motion")
                   else 0)


@dataclass
class Encoders:
    """The models that turn a window into a sample.

    ``vae``: :class:`~liveavatar.models.vae.WanVAE` or :class:`~liveavatar.models.vae.PatchVAE`; ``audio``:
    ``(wav [samples] at 16 kHz, frames) -> [1, frames, layers, feat]`` with ``num_layers``/``feature_dim``
    attributes; ``text``: a :class:`~liveavatar.models.text.TextEncoder`; ``vae_kind``: recorded in the manifest.
    """

    vae: Any
    audio: Any
    text: Any
    vae_kind: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def shapes(self, settings: Settings) -> dict:
        """The manifest's ``shapes``: everything a model needs to agree with."""
        h, w = settings.size
        f = self.vae.space_factor
        if h % f or w % f:
            raise ValueError(f"resolution {h}x{w} is not divisible by the VAE's space factor {f}")
        return {
            "latent_channels": int(self.vae.latent_channels), "latent_frames": settings.latent_frames,
            "latent_height": h // f, "latent_width": w // f,
            "video_frames": int(self.vae.video_frames(settings.latent_frames)), "height": h, "width": w,
            "audio_layers": int(self.audio.num_layers), "audio_feature_dim": int(self.audio.feature_dim),
            "text_len": int(self.text.text_len), "text_dim": int(self.text.text_dim),
            "fps": settings.fps, "sample_rate": SAMPLE_RATE,
            "vae": self.vae_kind, "vae_time_factor": int(self.vae.time_factor), "vae_space_factor": int(f),
            "sink_motion_latents": self.latent_frames_of(settings.sink_motion_frames),
        }

    def latent_frames_of(self, video_frames: int) -> int:
        """Latent frames the VAE makes of ``video_frames`` (0 of 0): the first frame alone, then one per
        ``time_factor``."""
        return 0 if video_frames <= 0 else 1 + (video_frames - 1) // int(self.vae.time_factor)

    @staticmethod
    def sample_shapes(shapes: dict) -> dict[str, tuple[int, ...]]:
        """Per-sample tensor shapes from the manifest's ``shapes``."""
        c, fr, h, w = (shapes[k] for k in ("latent_channels", "latent_frames", "latent_height", "latent_width"))
        out = {"latents": (c, fr, h, w), "reference": (c, 1, h, w),
               "audio": (shapes["video_frames"], shapes["audio_layers"], shapes["audio_feature_dim"]),
               "text": (shapes["text_len"], shapes["text_dim"])}
        if shapes.get("sink_motion_latents"):
            out["sink_motion"] = (c, shapes["sink_motion_latents"], h, w)
        return out


# ------------------------------------------------------------------------------------------------- inputs


def find_videos(root: Path) -> list[Path]:
    """Video files under ``root`` (recursively, sorted; hidden files and folders are ignored)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in filenames
                  if not n.startswith(".") and Path(n).suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(found)


def caption_path(video: Path) -> Path:
    return video.with_suffix(".txt")


def read_caption(video: Path) -> str | None:
    """The caption next to ``video`` (None without one); an unusable one raises :class:`SkipVideo`."""
    path = caption_path(video)
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise SkipVideo(f"caption {path.name} is not UTF-8 text") from None
    except OSError as err:
        raise SkipVideo(f"caption {path.name} cannot be read ({err.strerror or err})") from None
    if not text:
        raise SkipVideo(f"caption {path.name} is empty")
    return text


def input_digest(root: Path, videos: list[Path]) -> str:
    """A fingerprint of the inputs: relative path, size and modification time of every video and caption."""
    h = hashlib.sha256()
    for v in videos:
        for p in (v, caption_path(v)):
            try:
                st = p.stat()
                h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                pass
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- frames


# ------------------------------------------------------------------------------------------------ samples


class VideoEncoder:
    """Turns one video into its samples (see :mod:`liveavatar.data.shards`) with ``encoders`` and ``settings``."""

    def __init__(self, encoders: Encoders, settings: Settings, reader: str | media.VideoReader = "pyav"):
        self.enc, self.settings = encoders, settings
        self.reader = media.get_reader(reader)  # decodes the frames; the audio is always read with PyAV
        self.shapes = encoders.shapes(settings)
        self.window = self.shapes["video_frames"]
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode_frames(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """``T`` frames ``[3, H, W]`` -> latents ``[C, F, h, w]`` (float32, CPU)."""
        video = torch.stack(frames, dim=1)[None].to(self.enc.device)  # [1, 3, T, H, W]
        return self.enc.vae.encode(video)[0].float().cpu()

    @torch.no_grad()
    def text(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption -> (embedding ``[text_len, text_dim]`` zero-padded, length: int64 scalar)."""
        if prompt in self._prompt_cache:  # only the default prompt is cached: it repeats, real captions rarely do
            return self._prompt_cache[prompt]
        emb, lengths = self.enc.text([prompt])
        text_len, text_dim = self.shapes["text_len"], self.shapes["text_dim"]
        emb = emb[0, :text_len].float().cpu()
        out = torch.zeros(text_len, text_dim)
        out[: emb.shape[0]] = emb
        result = (out, torch.tensor(min(int(lengths[0]), text_len), dtype=torch.int64))
        if prompt == self.settings.default_prompt:
            self._prompt_cache[prompt] = result
        return result

    @torch.no_grad()
    def audio(self, wav, frames: int) -> torch.Tensor:
        """``wav`` ``[samples]`` -> features ``[frames, layers, feat]`` (float32, CPU)."""
        return self.enc.audio(wav, frames)[0].float().cpu()

    def __call__(self, path: Path, source: str) -> list[dict]:
        """The samples of the video at ``path`` (``source``: its name in the manifest); :class:`SkipVideo` when
        it cannot be used. All or nothing: a failure half-way drops the video's samples."""
        s, window = self.settings, self.window
        caption = read_caption(path)
        try:
            info = media.probe(path)
            if not info["has_video"]:
                raise SkipVideo("no video stream")
            if not info["has_audio"]:
                raise SkipVideo("no audio track")
            wav = media.read_audio(path, SAMPLE_RATE)
            audio_frames = frames_in(len(wav), s.fps)  # as infer.py counts them
            if audio_frames < window:
                raise SkipVideo(f"too short: its audio covers {audio_frames} frames at {s.fps:g} fps, a sample needs {window}")
            clip_features = self.audio(wav, audio_frames) if s.audio_context == "clip" else None
            text, text_len = self.text(caption if caption is not None else s.default_prompt)

            samples, frames, reference, count = [], [], None, 0
            ref_index = {"first": 0, "last": None}.get(s.reference_frame, s.reference_frame)  # None: keep the latest
            for j, frame in enumerate(media.iter_video_frames(path, s.fps, s.size, reader=self.reader)):
                count = j + 1
                if ref_index is None or j == ref_index:
                    reference = frame
                start = j - len(frames)
                if start + window <= audio_frames:
                    frames.append(frame)
                    if len(frames) == window:
                        samples.append(self._sample(frames, start, wav, clip_features, text, text_len, source))
                        frames = []
                elif ref_index is not None and reference is not None:
                    break  # no more windows with audio, and the reference is already known
        except media.MediaError as err:
            raise SkipVideo(str(err)) from None
        if not samples:
            raise SkipVideo(f"too short: {count} video frames at {s.fps:g} fps, a sample needs {window}")
        if reference is None:
            raise SkipVideo(f"has {count} frames at {s.fps:g} fps, fewer than data.reference_frame={s.reference_frame} + 1")
        ref_latent = self.encode_frames([reference])  # [C, 1, h, w]
        still = self.encode_frames([reference] * s.sink_motion_frames) if s.sink_motion_frames else None
        for sample in samples:
            sample["reference"] = ref_latent
            if still is not None:
                sample["sink_motion"] = still
        return samples

    def _sample(self, frames, start, wav, clip_features, text, text_len, source) -> dict:
        if clip_features is not None:
            audio = clip_features[start : start + self.window]
        else:
            a0, a1 = (round(f * SAMPLE_RATE / self.settings.fps) for f in (start, start + self.window))
            audio = self.audio(wav[a0:a1], self.window)
        return {"latents": self.encode_frames(frames), "audio": audio, "text": text, "text_len": text_len,
                "source": source, "start": start}


# ------------------------------------------------------------------------------------------- output folder


class FolderError(ValueError):
    """The output folder cannot be written as asked; the message is one line."""


def check_output(out: Path, identity: dict, digest: str, overwrite: bool) -> dict | None:
    """Decide what to do with ``out`` (nothing is changed yet). Returns its manifest when that was made with the
    same settings (``identity``) and inputs (``digest``) and is complete: nothing to do. Returns None when a run may
    write there (empty, missing, leftovers of an interrupted run, or ``overwrite``). Raises :class:`FolderError`
    when it holds something else."""
    if out.exists() and not out.is_dir():
        raise FolderError(f"out={out}: is a file, not a folder")
    entries = [p.name for p in out.iterdir()] if out.exists() else []
    if shards.MANIFEST in entries:
        try:
            manifest = shards.read_manifest(out)
        except ValueError:
            manifest = None
        same_settings = manifest is not None and all(manifest.get(k) == v for k, v in identity.items())
        same_inputs = manifest is not None and manifest.get("inputs", {}).get("digest") == digest
        complete = manifest is not None and all((out / s["file"]).is_file() for s in manifest["shards"])
        if same_settings and same_inputs and complete and not overwrite:
            return manifest
        if not overwrite:
            why = ("its manifest.json is unreadable" if manifest is None else
                   "its shards are incomplete" if not complete else
                   "it was made with other settings" if not same_settings else "it was made from other inputs")
            raise FolderError(f"out={out}: already holds preprocessed shards but {why}; "
                              "pass overwrite=true to replace them, or choose another folder")
    elif not overwrite and not all(shards.is_own_file(n) for n in entries):
        raise FolderError(f"out={out}: is not empty and holds no preprocessing manifest; "
                          "choose an empty folder or pass overwrite=true")
    return None


def clear_output(out: Path) -> None:
    """Create ``out`` and delete what earlier runs wrote there (the manifest first, so the folder never claims
    shards it lacks). Only our own files go (shards of an interrupted run, or those being replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_file() and shards.is_own_file(p.name):
            p.unlink()


# ------------------------------------------------------------------------------------------------------ run


@dataclass
class Result:
    out: Path
    videos: int
    samples: int
    shards: int
    skipped: list[dict]
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return (f"{self.out} is up to date (same settings and inputs): {self.samples} samples in "
                    f"{_plural(self.shards, 'shard')}; nothing to do")
        return (f"wrote {self.samples} samples in {_plural(self.shards, 'shard')} to {self.out} from "
                f"{_plural(self.videos, 'video')} ({len(self.skipped)} skipped)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def preprocess_folder(videos: str | os.PathLike, out: str | os.PathLike, encoders: Encoders | Callable[[], Encoders],
                      settings: Settings, model: dict, overwrite: bool = False, progress: bool = True,
                      reader: str | media.VideoReader = "pyav") -> Result:
    """Preprocess every video under ``videos`` into shards and a manifest in ``out``.

    ``encoders``: the models, or a function that loads them, called only once there is work to do (an up-to-date or
    occupied ``out`` is reported without waiting for a 10 GB text encoder). ``model``: the preset's configuration
    (at least ``name``; it must describe the encoders), recorded in the manifest; with ``settings`` it decides
    whether an existing ``out`` is up to date. ``reader``: how frames are decoded (``pyav`` or ``decord``, see
    :func:`liveavatar.media.get_reader`); both give the same frames, so it is recorded but does not make an existing
    ``out`` out of date. Raises ``ValueError`` (one line) for a missing or empty input folder,
    an occupied output folder (:class:`FolderError`) or no usable video.
    """
    root, out = Path(videos).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise ValueError(f"videos={videos}: {'not a folder' if root.exists() else 'no such folder'}")
    paths = find_videos(root)
    if out != root:  # an output folder inside the input folder is not input
        paths = [p for p in paths if out not in p.parents]
    if not paths:
        raise ValueError(f"videos={videos}: no video files ({' '.join(VIDEO_EXTENSIONS)}) in it or below it")
    # What decides whether an existing output is up to date; normalised the way it reads back from JSON.
    identity = json.loads(json.dumps({"model": model, "data": asdict(settings)}))
    digest = input_digest(root, paths)
    existing = check_output(out, identity, digest, overwrite)
    if existing is not None:
        return Result(out, len(paths), len(existing["samples"]), len(existing["shards"]), existing["skipped"], True)

    reader = media.get_reader(reader)
    video_encoder = VideoEncoder(encoders() if callable(encoders) else encoders, settings, reader)
    shapes = video_encoder.shapes
    clear_output(out)
    writer = shards.ShardWriter(out, settings.shard_size, Encoders.sample_shapes(shapes))
    skipped: list[dict] = []
    bar = tqdm(paths, unit="video", desc="preprocessing", disable=not progress, dynamic_ncols=True)
    for path in bar:
        source = path.relative_to(root).as_posix()
        try:
            for sample in video_encoder(path, source):
                writer.add(sample)
        except SkipVideo as why:
            skipped.append({"source": source, "reason": str(why)})
        bar.set_postfix(samples=writer.count, skipped=len(skipped), refresh=False)
    bar.close()
    writer.close()
    if not writer.samples:
        clear_output(out)
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"videos={videos}: no usable video ({len(skipped)} skipped: {reasons}"
                         f"{'; ...' if len(skipped) > 3 else ''})")
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION, **identity, "shapes": shapes,
        "inputs": {"folder": str(root), "videos": len(paths), "digest": digest, "reader": reader.name},
        "shards": writer.shards, "samples": writer.samples, "skipped": skipped,
    }
    shards.write_json(out / shards.MANIFEST, manifest)
    return Result(out, len(paths), len(writer.samples), len(writer.shards), skipped)


# ---------------------------------------------------------------------------------------- config entry point


def build_encoders(cfg: DictConfig, device: torch.device) -> Encoders:
    """The VAE, audio and text encoders of the preset ``cfg.model`` (errors: ``UserError``)."""
    parts = Components(cfg.model, device)
    return Encoders(parts.vae, parts.audio_encoder, parts.text_encoder, str(cfg.model.vae.kind), device)


@torch.no_grad()
def run(cfg: DictConfig) -> Result:
    """Preprocess ``cfg.videos`` into ``cfg.out`` with the preset ``cfg.model`` (see ``conf/preprocess.yaml``).
    Every user mistake becomes a one-line ``UserError``."""
    for key in ("videos", "out"):
        if not cfg.get(key):
            raise UserError(f"{key}: required (python -m liveavatar.data.preprocess videos=DIR out=DIR)")
    try:
        settings = Settings.from_config(cfg)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    device = resolve_device(str(cfg.device))
    try:
        reader = media.get_reader(str(cfg.get("reader", "pyav")))
    except (ValueError, ImportError) as err:
        raise UserError(str(err)) from err
    fpb = int(cfg.model.dit.frames_per_block)
    if settings.latent_frames % fpb:  # known before loading anything; the rest is checked once the models are
        raise UserError(f"data.clip_latent_frames={settings.latent_frames}: not a multiple of "
                        f"model.dit.frames_per_block {fpb}")

    def load() -> Encoders:
        encoders = build_encoders(cfg, device)
        try:
            shapes = encoders.shapes(settings)
            # Refuse shards the preset's own DiT could not train on, before spending hours on them.
            problems = shards.fit_problems(shapes, cfg.model.dit)
        except (ValueError, TypeError) as err:
            raise UserError(f"model={cfg.model.name}: {err}") from err
        if problems:
            raise UserError(f"model={cfg.model.name}: the samples would not fit its DiT: {'; '.join(problems)}")
        return encoders

    model = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        return preprocess_folder(cfg.videos, cfg.out, load, settings, model, overwrite=bool(cfg.overwrite),
                                 reader=reader)
    except ValueError as err:
        raise UserError(str(err)) from err


def main() -> None:
    import hydra

    from ..cli import CONF, check_group_choices, fail

    if not (CONF / "preprocess.yaml").is_file():
        fail(f"{CONF}/preprocess.yaml not found (run from a source checkout)")
    check_group_choices(sys.argv[1:], ("model",))

    @hydra.main(config_path=str(CONF), config_name="preprocess", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            result = run(cfg)
        except UserError as err:
            fail(str(err))
        except KeyboardInterrupt:
            print(f"interrupted: {cfg.out} has no manifest; the next run starts over", file=sys.stderr)
            sys.exit(130)
        if not result.up_to_date:
            for s in result.skipped:
                print(f"skipped {s['source']}: {s['reason']}")
        print(result.summary())

    _main()


if __name__ == "__main__":
    main()
