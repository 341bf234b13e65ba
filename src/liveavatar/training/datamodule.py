"""Training data: the toy world generated on the fly, or preprocessed shards of real videos.

Both give samples in one format (see :mod:`liveavatar.data.shards`)::

    latents   [C, F, h, w]        VAE latents of F latent frames
    reference [C, 1, h, w]        VAE latent of the reference image
    audio     [V, layers, feat]   audio encoder features, one row per video frame
    text      [text_len, text_dim] text embedding, zero-padded
    motion    [C, K, h, w]        with data.motion_frames = K > 0 (toy only): the K latent frames before the clip
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..components import SAMPLE_RATE, Components, UserError, toy_preset
from ..data import toy
from ..models.config import DiTConfig
from ..models.interaction import talk_listen_features


class ToyDataset(Dataset):
    """Clips of the procedural toy world, encoded with the preset's components (the patch VAE, the weight-free
    audio features at the preset's frame rate, the text encoder), built by :mod:`liveavatar.components`.

    Clip ``i`` is ``toy.make_clip(seed * 1_000_003 + i, ...)``: deterministic, so a dataset is defined by its
    ``seed`` and ``size`` and nothing is stored. Different seeds give disjoint identities in practice (held-out
    evaluation uses another seed).

    Args:
        size: number of distinct clips (an epoch).
        latent_frames: latent frames per sample (the patch VAE has no time compression: = video frames).
        dit: the model config (text and audio widths).
        preset: the model preset (``conf/model/*.yaml`` as a mapping: ``fps``, ``resolution``, ``vae``,
            ``audio_encoder``, ``text_encoder``); None: :func:`liveavatar.components.toy_preset` (``model=tiny``'s).
        prompt: the (constant) caption, embedded once.
        motion_frames: ``K``: the clip is the last ``latent_frames`` frames of a ``K + latent_frames`` stream, and
            the sample's ``motion`` holds the ``K`` before it.
        sink_motion_frames: with ``n > 0`` the sample's ``sink_motion`` holds the latents of the reference image held
            still for ``n`` video frames (``model.sink_motion``).
        mouth_regions: the sample's ``mouth_region [F, h, w]`` marks on the latent grid where the mouth can be
            (:func:`~liveavatar.data.toy.mouth_region`), for ``loss.mouth_weight``.
    """

    def __init__(self, size: int, latent_frames: int, dit: DiTConfig, preset: Mapping | None = None, seed: int = 0,
                 prompt: str = "a person talking to the camera", motion_frames: int = 0,
                 sink_motion_frames: int = 0, mouth_regions: bool = False):
        self.size, self.frames, self.seed = int(size), int(latent_frames), int(seed)
        self.mouth_regions = bool(mouth_regions)
        self.motion_frames, self.sink_motion_frames = int(motion_frames), int(sink_motion_frames)
        # A listening model learns from conversations: two voices and who holds the turn (models/interaction.py).
        self.conversation = dit.listening
        if self.motion_frames < 0:
            raise ValueError(f"data.motion_frames must not be negative, got {motion_frames}")
        # The text encoder follows the DiT being trained, whatever the preset's dit section says.
        try:
            parts = Components({**(preset or toy_preset(dit)), "dit": dit.to_dict()})
            self.fps, self.resolution = parts.fps, parts.resolution
            self.vae, self.audio, text_encoder = parts.vae, parts.audio_encoder, parts.text_encoder
        except UserError as err:  # train.py reports data problems raised as ValueError in one line
            raise ValueError(str(err)) from err
        if dit.has_audio and (self.audio.num_layers, self.audio.feature_dim) != (dit.audio_layers_in, dit.audio_feature_dim):
            raise ValueError(f"toy audio features are [{self.audio.num_layers}, {self.audio.feature_dim}] per frame; "
                             f"the model expects [{dit.audio_layers_in}, {dit.audio_feature_dim}] (model.audio_encoder.n_mels)")
        if self.vae.latent_channels != dit.in_dim:
            raise ValueError(f"toy latents have {self.vae.latent_channels} channels; the model's in_dim is {dit.in_dim}")
        context, _ = text_encoder([prompt])
        self.text = torch.zeros(dit.text_len, dit.text_dim)
        self.text[: context.shape[1]] = context[0, : dit.text_len].cpu()

    def __len__(self) -> int:
        return self.size

    def clip_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def features(self, clip: toy.ToyClip, frames: int) -> torch.Tensor:
        """Audio features ``[1, frames, layers, feat]`` of the clip; a conversation's two voices masked by the turns
        and stacked on the layer axis (:func:`~liveavatar.models.interaction.talk_listen_features`)."""
        own = self.audio(clip.wav, frames)
        if not self.conversation:
            return own
        return talk_listen_features(own, self.audio(clip.listen_wav, frames), torch.from_numpy(clip.speaking))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        k = self.motion_frames
        clip = toy.make_clip(self.clip_seed(index), k + self.frames, size=self.resolution, fps=self.fps,
                             sample_rate=SAMPLE_RATE, conversation=self.conversation)
        latents = self.vae.encode(clip.video[None])[0]  # the patch VAE codes frames one by one, so split after
        # Audio features of the whole stream, then the clip's rows: a frame's analysis window reaches back into
        # the audio of the frame before, which a clip cut out of a stream has (and a clip of its own would not).
        sample = {
            "latents": latents[:, k:],
            "reference": self.vae.encode(clip.reference[None, :, None])[0],
            "audio": self.features(clip, k + self.frames)[0, k:],
            "text": self.text,
        }
        if self.mouth_regions:
            # On the latent grid: a latent pixel counts as much as the most mouth-covered pixel it codes.
            region = toy.mouth_region(clip.identity, clip.head, self.resolution)[k:]
            sample["mouth_region"] = F.adaptive_max_pool3d(region[None], tuple(latents.shape[1:]))[0]
        if k:
            sample["motion"] = latents[:, :k]
        if self.sink_motion_frames:
            still = clip.reference[None, :, None].expand(-1, -1, self.sink_motion_frames, -1, -1)
            sample["sink_motion"] = self.vae.encode(still.contiguous())[0]
        return sample


@dataclass
class DataSettings:
    """``data.*`` keys (see ``conf/data/*.yaml``)."""

    kind: str = "toy"               # toy | shards
    path: str | None = None         # shards: the preprocessed folder
    batch_size: int = 8
    num_workers: int = 0
    latent_frames: int = 6          # toy: latent frames per clip
    size: int = 1_000_000           # toy: distinct clips
    seed: int = 0                   # toy: which clips
    prompt: str = "a person talking to the camera"
    motion_frames: int = 0          # Stage 1: latent frames before each clip given as noisy context (toy only)
    shuffle: bool = True            # false: clips in order (across ranks: rank r takes clips r, r + N, ...)
    mouth_regions: bool = False     # toy: samples carry mouth_region (set by train.py when loss.mouth_weight > 0)


class AvatarDataModule(L.LightningDataModule):
    """Train loader over the toy world or shards; checks that the data fits the model before training."""

    def __init__(self, settings: DataSettings, dit: DiTConfig, model_preset: dict):
        super().__init__()
        self.settings, self.dit, self.preset = settings, dit, model_preset
        # model.sink_motion: every sample carries the latents of its reference held still (the sink's motion tokens)
        self.sink_motion_frames = dit.motion_video_frames if model_preset.get("sink_motion") else 0
        self.dataset: Dataset | None = None

    def build(self) -> Dataset:
        s = self.settings
        if self.dit.listening and s.kind != "toy":
            raise ValueError("model.dit.listening=true: training a listening model needs two voices and speaking "
                             "labels per clip, which preprocessing does not make yet (data=toy makes conversations)")
        if s.kind == "toy":
            vae, enc = self.preset["vae"], self.preset["audio_encoder"]
            if vae["kind"] != "patch" or enc["kind"] != "energy_mel":
                raise ValueError("data=toy needs a model preset with the patch VAE and energy_mel audio (model=tiny)")
            return ToyDataset(s.size, s.latent_frames, self.dit, self.preset, s.seed, s.prompt, s.motion_frames,
                              self.sink_motion_frames, s.mouth_regions)
        if s.mouth_regions:
            raise ValueError("loss.mouth_weight > 0 needs mouth regions, which only data=toy makes (shards have no "
                             "lip masks yet)")
        if s.kind == "shards":
            from ..data.shards import ShardDataset

            if not s.path:
                raise ValueError("data=shards needs data.path (a folder written by python -m liveavatar.data.preprocess)")
            if s.motion_frames:
                raise ValueError(f"data.motion_frames={s.motion_frames}: shards hold no motion frames (preprocessing "
                                 f"does not store the latents before each window); train on them with "
                                 f"data.motion_frames=0")
            dataset = ShardDataset(s.path)
            dataset.check(self.dit)
            if self.sink_motion_frames and not dataset.shapes.get("sink_motion_latents"):
                raise ValueError(f"model.sink_motion=true: the shards in {s.path} hold no sink motion latents; "
                                 f"preprocess them with model.sink_motion=true")
            return dataset
        raise ValueError(f"data.kind must be toy or shards, got {s.kind!r}")

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.build()

    def train_dataloader(self) -> DataLoader:
        s = self.settings
        trainer = self.trainer
        if trainer is None:  # outside a Trainer (tests, scripts): plain order or a fresh shuffle
            return DataLoader(self.dataset, batch_size=s.batch_size, shuffle=s.shuffle, num_workers=s.num_workers,
                              drop_last=True, collate_fn=collate)
        replicas = trainer.distributed_sampler_kwargs or {"num_replicas": 1, "rank": 0}
        sampler = ClipOrder(self.dataset, shuffle=s.shuffle, seed=s.seed, **replicas)
        # A resumed run continues the epoch where the killed one stopped (Lightning restores the step counter
        # before it asks for the loader), instead of seeing the epoch's first clips again.
        batches = trainer.global_step * trainer.accumulate_grad_batches
        sampler.start_at(trainer.current_epoch, batches % max(1, len(sampler) // s.batch_size) * s.batch_size)
        return DataLoader(self.dataset, batch_size=s.batch_size, sampler=sampler, num_workers=s.num_workers,
                          drop_last=True, persistent_workers=s.num_workers > 0, collate_fn=collate)


class ClipOrder(DistributedSampler):
    """This rank's clips of an epoch: a permutation seeded by ``(data.seed, epoch)`` (or the clips in order),
    dealt to the ranks in turn (rank r of N takes positions r, r + N, ...), so a run over N ranks sees what one
    process with N times the batch sees; :meth:`start_at` skips the clips a resumed run already trained on. One
    process is ``num_replicas=1``; Lightning keeps this sampler as it is (it is a ``DistributedSampler``), where
    it would put its own, always shuffling, one in its place."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip_epoch, self.skip = 0, 0

    def start_at(self, epoch: int, clips: int) -> None:
        """In epoch ``epoch`` only, begin after this rank's first ``clips`` clips."""
        self.skip_epoch, self.skip = epoch, clips

    def _skipped(self) -> int:
        return self.skip if self.epoch == self.skip_epoch else 0

    def __iter__(self):
        return iter(list(super().__iter__())[self._skipped():])

    def __len__(self) -> int:
        return super().__len__() - self._skipped()


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep other fields (sources, starts) as lists."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
