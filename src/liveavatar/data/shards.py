"""Preprocessed training samples on disk: safetensors shards plus a ``manifest.json``, and the Dataset reading them.

One sample (what the training code consumes, what :class:`ShardDataset` returns)::

    {"latents":   float32 [C, F, h, w]        normalized VAE latents of one window of video frames,
     "reference": float32 [C, 1, h, w]        VAE latent of the reference frame (same video),
     "audio":     float32 [V, layers, feat]   audio features, one row per video frame of the window,
     "text":      float32 [text_len, text_dim] caption embedding, zero past ``text_len``,
     "text_len":  int64 scalar tensor          tokens of the caption,
     "sink_motion": float32 [C, K, h, w]       (only with ``model.sink_motion``) the reference frame held still,
                                               VAE-encoded: the latents of the sink's FramePack motion tokens,
     "source":    str                          video path relative to the input folder,
     "start":     int}                         first video frame (at the model's fps) of the window

A shard ``shard-NNNNN.safetensors`` stacks up to ``shard_size`` samples: ``latents [N, ...]``, ``reference
[N, ...]``, ``audio [N, ...]``, ``start [N]``. Captions are stored once per distinct caption in the shard
(``text [U, text_len, text_dim]``, ``text_len [U]``, ``text_index [N]``): every window of a video shares its
caption, and at umT5's width (512 x 4096 floats, 8 MB) it would otherwise outweigh the latents. ``sink_motion``
is stored the same way, once per run of samples with the same one (``sink_motion [U2, ...]``,
``sink_motion_index [N]``): it belongs to the video, not the window.

``manifest.json`` is written last and atomically; a folder without one is not a finished dataset.
"""
from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "ShardWriter",
    "ShardDataset",
    "shard_name",
    "is_own_file",
    "write_json",
    "read_manifest",
    "fit_problems",
]

FORMAT = "liveavatar-shards"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _partial(path: Path) -> Path:
    """Hidden temporary name next to ``path``: renamed onto it only once complete."""
    return path.with_name(f".{path.name}.partial")


def is_own_file(name: str) -> bool:
    """Whether a file name is one this module writes (a shard, the manifest, or their temporary names)."""
    name = name[1:].removesuffix(".partial") if name.startswith(".") and name.endswith(".partial") else name
    return name == MANIFEST or bool(_SHARD_RE.fullmatch(name))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = _partial(path)
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Collects samples and writes a shard every ``shard_size`` of them (and the rest on :meth:`close`).

    ``shapes`` (``{"latents": (C, F, h, w), "reference": ..., "audio": ..., "text": ...}``) is checked for every
    sample, so a shard never mixes shapes. Each shard goes to a hidden temporary name first.
    """

    def __init__(self, folder: str | os.PathLike, shard_size: int, shapes: dict[str, tuple[int, ...]]):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.shard_size = Path(folder), int(shard_size)
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.shards: list[dict] = []    # {"file", "samples"} of the shards written so far
        self.samples: list[dict] = []   # {"source", "start"} of every sample written so far, in order
        self._pending: list[dict] = []

    @property
    def count(self) -> int:
        """Samples added so far (written or pending)."""
        return len(self.samples) + len(self._pending)

    def add(self, sample: dict) -> None:
        for key in self.shapes:
            got = tuple(sample[key].shape)
            if got != self.shapes[key]:
                raise ValueError(f"sample {key} of {sample['source']} has shape {got}, the shards hold {self.shapes[key]}")
        self._pending.append(sample)
        if len(self._pending) == self.shard_size:
            self._flush()

    def close(self) -> None:
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        batch, self._pending = self._pending, []
        texts, lengths, index = [], [], []
        for s in batch:  # consecutive windows of one video share their caption: store it once
            if not texts or int(s["text_len"]) != lengths[-1] or not torch.equal(s["text"], texts[-1]):
                texts.append(s["text"])
                lengths.append(int(s["text_len"]))
            index.append(len(texts) - 1)
        tensors = {key: torch.stack([s[key] for s in batch]).float().contiguous() for key in ("latents", "reference", "audio")}
        if "sink_motion" in self.shapes:  # one per video: stored once per run of samples that share it
            still, still_index = [], []
            for s in batch:
                if not still or not torch.equal(s["sink_motion"], still[-1]):
                    still.append(s["sink_motion"])
                still_index.append(len(still) - 1)
            tensors.update(sink_motion=torch.stack(still).float().contiguous(),
                           sink_motion_index=torch.tensor(still_index, dtype=torch.int64))
        tensors.update(
            text=torch.stack(texts).float().contiguous(),
            text_len=torch.tensor(lengths, dtype=torch.int64),
            text_index=torch.tensor(index, dtype=torch.int64),
            start=torch.tensor([int(s["start"]) for s in batch], dtype=torch.int64),
        )
        path = self.folder / shard_name(len(self.shards))
        tmp = _partial(path)
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files private (0600); shards are meant to be shared
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.shards.append({"file": path.name, "samples": len(batch)})
        self.samples.extend({"source": s["source"], "start": int(s["start"])} for s in batch)


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a shard folder; ``ValueError`` naming the path when it is missing or not ours."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {Path(folder)} a folder made by liveavatar.data.preprocess?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable or corrupt ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format version {manifest.get('version')}, this code reads version {VERSION}")
    try:
        counts = [int(s["samples"]) for s in manifest["shards"]]
        if len(manifest["samples"]) != sum(counts) or not isinstance(manifest["shapes"], dict):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: corrupt (shard list, sample list and shapes do not agree)") from None
    return manifest


def _as_dit_config(dit_config):
    from ..models.config import DiTConfig

    if isinstance(dit_config, DiTConfig):
        return dit_config
    if not isinstance(dit_config, dict):
        from omegaconf import OmegaConf

        dit_config = OmegaConf.to_container(dit_config, resolve=True)
    return DiTConfig.from_dict(dit_config)


def fit_problems(shapes: dict, dit_config) -> list[str]:
    """What keeps samples of ``shapes`` (a manifest's ``shapes``) from feeding a DiT of ``dit_config``
    (a :class:`DiTConfig`, a dict or the ``model.dit`` config node); empty when they fit."""
    dit = _as_dit_config(dit_config)
    s, problems = shapes, []
    if s["latent_channels"] != dit.in_dim:
        problems.append(f"latent channels {s['latent_channels']} != model in_dim {dit.in_dim}")
    if s["latent_frames"] % dit.frames_per_block:
        problems.append(f"{s['latent_frames']} latent frames per sample is not a multiple of "
                        f"frames_per_block {dit.frames_per_block}")
    expected_video = 1 + dit.video_frames_per_latent * (s["latent_frames"] - 1)
    if s["video_frames"] != expected_video:
        problems.append(f"{s['video_frames']} video frames per {s['latent_frames']} latent frames, the model groups "
                        f"video_frames_per_latent={dit.video_frames_per_latent} (expects {expected_video})")
    _, ph, pw = dit.patch_size
    if s["latent_height"] % ph or s["latent_width"] % pw:
        problems.append(f"latent size {s['latent_height']}x{s['latent_width']} is not divisible by the patch size {ph}x{pw}")
    if s["text_dim"] != dit.text_dim:
        problems.append(f"text_dim {s['text_dim']} != model text_dim {dit.text_dim}")
    if s["text_len"] > dit.text_len:
        problems.append(f"text_len {s['text_len']} > model text_len {dit.text_len}")
    if dit.has_audio and (s["audio_layers"], s["audio_feature_dim"]) != (dit.audio_layers_in, dit.audio_feature_dim):
        problems.append(f"audio features [{s['audio_layers']}, {s['audio_feature_dim']}] != model "
                        f"[audio_layers_in {dit.audio_layers_in}, audio_feature_dim {dit.audio_feature_dim}]")
    return problems


@dataclass
class _Handles:
    """safetensors files opened by one process (a DataLoader worker opens its own)."""

    pid: int = field(default_factory=os.getpid)
    files: dict[int, Any] = field(default_factory=dict)


class ShardDataset(Dataset):
    """The samples of a folder written by :mod:`liveavatar.data.preprocess` (see the module docstring for the
    sample format). Shards are opened lazily with ``safe_open`` (memory-mapped), once per process, so the
    dataset can be handed to DataLoader workers. ``dit_config``: check the shards fit that model (:meth:`check`).
    """

    def __init__(self, path: str | os.PathLike, dit_config=None):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.shapes: dict = self.manifest["shapes"]
        self.files = [self.root / s["file"] for s in self.manifest["shards"]]
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            raise ValueError(f"{self.root}: the manifest lists {missing[0]}, which is missing (an incomplete copy?)")
        self._ends = []  # cumulative sample counts: shard k holds indices [ends[k-1], ends[k])
        total = 0
        for s in self.manifest["shards"]:
            total += int(s["samples"])
            self._ends.append(total)
        self._samples = self.manifest["samples"]
        self._handles = _Handles()
        if dit_config is not None:
            self.check(dit_config)

    def check(self, dit_config) -> None:
        """Raise ``ValueError`` (one line) if the samples cannot feed a DiT of ``dit_config``."""
        problems = fit_problems(self.shapes, dit_config)
        if problems:
            raise ValueError(f"{self.root}: shards (model={self.manifest.get('model', {}).get('name')}) do not fit "
                             f"the model: {'; '.join(problems)}")

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _file(self, shard: int):
        from safetensors import safe_open

        if self._handles.pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._handles = _Handles()
        handle = self._handles.files.get(shard)
        if handle is None:
            handle = self._handles.files[shard] = safe_open(str(self.files[shard]), framework="pt")
        return handle

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        index %= n
        shard = bisect.bisect_right(self._ends, index)
        row = index - (self._ends[shard - 1] if shard else 0)
        f = self._file(shard)

        def rows(key: str, i: int) -> torch.Tensor:
            return f.get_slice(key)[i : i + 1][0]

        u = int(rows("text_index", row))
        meta = self._samples[index]
        sample = {
            "latents": rows("latents", row), "reference": rows("reference", row), "audio": rows("audio", row),
            "text": rows("text", u), "text_len": rows("text_len", u),
            "source": meta["source"], "start": int(meta["start"]),
        }
        if self.shapes.get("sink_motion_latents"):
            sample["sink_motion"] = rows("sink_motion", int(rows("sink_motion_index", row)))
        return sample

    def __getstate__(self) -> dict:  # open files do not pickle; each worker reopens its own
        state = self.__dict__.copy()
        state["_handles"] = _Handles()
        return state
