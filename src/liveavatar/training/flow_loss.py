"""The flow-matching loss of Stage 0 (bidirectional teacher) and Stage 1 (Diffusion Forcing).

Both regress the velocity ``noise - x0`` of ``x_t = (1 - sigma) x0 + sigma noise``. They differ in the noise
levels: the teacher draws one level per clip and attends bidirectionally; Diffusion Forcing draws an
independent level per block of ``frames_per_block`` latent frames and attends block-causally, so that the
model learns to denoise a block given history at any noise level (what the streaming engine asks of it).

Diffusion Forcing trains what the engine streams: each block attends to the sink and at most
``window_blocks`` earlier blocks, with the sink at the position the policy gives it from that block, and each
clip placed at a random offset of a longer stream (:meth:`PositionPolicy.training_positions`). The teacher is
bidirectional with the reference at the model's ``reference_position``.

Conditioning dropout (for classifier-free guidance): each clip independently loses its text (zeros), its
audio (zero features) or both.

Evicted sink (``loss.sink_evicted = p``, Diffusion Forcing with a sink): a fraction ``p`` of the clips is trained as
``engine.sink=evicted`` streams it: the clip starts the stream, its reference sits as the frame before it, and only
the first ``window_blocks`` blocks see it (while a frame there would still be in the window); later blocks have only
their history to carry the identity. A model trained so can stream without its sink, which is the long-horizon
ablation's "without a sink" baseline; a model that never was collapses when the sink leaves.

Motion frames (Diffusion Forcing only, batches with ``motion``): the latent frames just before each clip enter
as context, each noised independently with ``t ~ U[0, 1000]``; they stand in for the noisy history the engine
streams from, and have no loss of their own. The teacher refuses them: it is the bidirectional Stage 0 model
that Stage 1 starts from, with no stream to continue.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion.flow import FlowSchedule
from ..engine.positions import PositionPolicy
from ..models.dit import AvatarDiT


@dataclass
class FlowLossConfig:
    """``loss.*`` keys of ``conf/train.yaml``."""

    shift: float = 5.0                   # schedule shift k of the training noise levels
    timesteps: str = "uniform"           # uniform (index into the shifted table) | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"              # none | bell (Self-Forcing's DF weight, peaked at t = 500)
    drop_text: float = 0.1               # probability of zeroing a clip's text embedding
    drop_audio: float = 0.1              # probability of zeroing a clip's audio features
    sink_evicted: float = 0.0            # Diffusion Forcing: fraction of clips whose sink leaves with the window
    mouth_weight: float = 0.0            # squared errors inside the batch's mouth_region count 1 + this much more

    def __post_init__(self):
        if self.weighting not in ("none", "bell"):
            raise ValueError(f"loss.weighting must be none or bell, got {self.weighting!r}")
        if self.mouth_weight < 0:
            raise ValueError(f"loss.mouth_weight must not be negative, got {self.mouth_weight}")
        for name in ("drop_text", "drop_audio", "sink_evicted"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loss.{name} must lie in [0, 1], got {getattr(self, name)}")


class FlowMatchingLoss:
    """Noise a batch, run the DiT, and return the (weighted) velocity MSE.

    Args:
        config: loss settings.
        causal: Diffusion Forcing (block-causal mask, one level per block) instead of the teacher.
        frames_per_block: latent frames per block (the model's ``frames_per_block``).
        positions: the streaming window and position policy (Diffusion Forcing); None: every earlier block is
            visible and positions are the clip's own.
    """

    def __init__(self, config: FlowLossConfig, causal: bool, frames_per_block: int,
                 positions: PositionPolicy | None = None):
        self.config, self.causal, self.frames_per_block = config, causal, frames_per_block
        self.positions = positions
        self.flow = FlowSchedule(config.shift)

    def noise_levels(self, batch: int, frames: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timesteps ``[B, F]``: constant per clip (teacher) or per block (Diffusion Forcing)."""
        c = self.config
        if not self.causal:
            t = self.flow.sample_timesteps((batch,), generator, c.timesteps, c.logit_mean, c.logit_std)
            return t[:, None].expand(batch, frames).to(device)
        if frames % self.frames_per_block:
            raise ValueError(f"clips of {frames} latent frames do not split into blocks of {self.frames_per_block}")
        blocks = frames // self.frames_per_block
        t = self.flow.sample_timesteps((batch, blocks), generator, c.timesteps, c.logit_mean, c.logit_std)
        return t.repeat_interleave(self.frames_per_block, dim=1).to(device)

    def motion_levels(self, batch: int, frames: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timesteps ``[B, K]`` of the motion frames: uniform in ``[0, 1000]``, independent per frame. Not through
        the shifted table (nor ``loss.timesteps``): the history the engine streams from is anywhere from clean
        to pure noise, and the shift would spend most draws near pure noise, where a frame carries no motion."""
        return (torch.rand(batch, frames, generator=generator) * self.flow.num_train_timesteps).to(device)

    def check_motion(self, motion_frames: int, frames: int) -> None:
        """Raise (one line) if clips of ``frames`` latent frames cannot train with ``motion_frames`` before them:
        the teacher takes none, and no block's sink may sit on a motion frame's position."""
        if not motion_frames:
            return
        if not self.causal:
            raise ValueError("motion frames (data.motion_frames > 0) are a Diffusion Forcing scaffold; the teacher "
                             "stage does not take them")
        if self.positions is not None:
            self.positions.check_context(motion_frames, frames)

    def evicted_placement(self, model: AvatarDiT, frame_pos: torch.Tensor, sink_pos: torch.Tensor, context: int,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Positions and sink visibility with a fraction ``sink_evicted`` of the clips placed as ``engine.sink=evicted``
        streams them: ``frame_pos [B, F]``, ``reference_pos [B, F / f, 1]``, ``sink_visible [B, F / f]``."""
        if model.config.reference != "sink":
            raise ValueError("loss.sink_evicted trains a sink that leaves with the window: it needs a model with "
                             "model.dit.reference=sink")
        if context:
            raise ValueError("loss.sink_evicted places clips at the start of the stream: it does not take motion "
                             "frames before them (data.motion_frames=0)")
        b, frames = frame_pos.shape
        blocks = frames // self.frames_per_block
        device = frame_pos.device
        # Drawn on the host (like every other placement decision) and copied: no device-to-host sync.
        evicted = (torch.rand(b, generator=generator) < self.config.sink_evicted).to(device)
        start = torch.arange(frames, device=device).expand(b, frames)
        reference = torch.full_like(sink_pos, self.positions.reference_position)
        in_window = (torch.arange(blocks, device=device) < self.positions.window_blocks).expand(b, blocks)
        return dict(frame_pos=torch.where(evicted[:, None], start, frame_pos),
                    reference_pos=torch.where(evicted[:, None], reference, sink_pos)[..., None],
                    sink_visible=~evicted[:, None] | in_window)

    def drop_conditions(self, text: torch.Tensor, audio: torch.Tensor | None, generator=None):
        """Zero each clip's text ``[B, L, D]`` and audio ``[B, V, ...]`` with the configured probabilities."""
        b = text.shape[0]
        keep_text = torch.rand(b, generator=generator) >= self.config.drop_text
        text = text * keep_text.to(text)[:, None, None]
        if audio is not None:
            keep_audio = torch.rand(b, generator=generator) >= self.config.drop_audio
            audio = audio * keep_audio.to(audio).reshape(b, *([1] * (audio.dim() - 1)))
        return text, audio

    def __call__(self, model: AvatarDiT, batch: dict[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of ``model`` on ``batch`` (the sample format of :mod:`liveavatar.data`):
        ``latents [B, C, F, h, w]``, ``reference [B, C, 1, h, w]``, ``audio [B, V, layers, feat]``,
        ``text [B, L, text_dim]``, optionally ``motion [B, C, K, h, w]`` and ``sink_motion [B, C, K', h, w]`` (the
        FramePack motion latents of the sink, ``model.sink_motion``) and ``mouth_region [B, F, h, w]``
        (``loss.mouth_weight``). Returns the scalar loss and per-batch
        statistics for logging."""
        x0 = batch["latents"].float()
        b, _, frames = x0.shape[:3]
        device = x0.device
        motion = batch.get("motion")
        k = 0 if motion is None else motion.shape[2]
        self.check_motion(k, frames)
        t = self.noise_levels(b, frames, device, generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device) if generator is not None \
            else torch.randn_like(x0)
        xt = self.flow.add_noise(x0, noise, t)
        audio = batch.get("audio") if model.config.has_audio else None
        text, audio = self.drop_conditions(batch["text"].float(), audio, generator)
        dtype = next(model.parameters()).dtype
        placement = {}
        if self.causal and self.positions is not None:
            frame_pos, sink_pos = self.positions.training_positions(b, frames, generator, device, context=k)
            placement = dict(frame_pos=frame_pos, reference_pos=sink_pos[..., None],
                             window_blocks=self.positions.window_blocks)
            if self.config.sink_evicted > 0:
                placement.update(self.evicted_placement(model, frame_pos, sink_pos, k, generator))
        if motion is not None:
            motion = motion.float()
            motion_t = self.motion_levels(b, k, device, generator)
            motion_noise = torch.randn(motion.shape, generator=generator, dtype=motion.dtype).to(device) \
                if generator is not None else torch.randn_like(motion)
            placement.update(motion=self.flow.add_noise(motion, motion_noise, motion_t).to(dtype), motion_t=motion_t)
        reference = batch.get("reference")
        # Text-image-to-video (reference=first_frame): the clip's own first frame is the clean image; it is given,
        # not predicted, so it has no loss.
        first_frame = model.config.reference == "first_frame"
        if first_frame:
            reference = x0[:, :, :1]
        if batch.get("sink_motion") is not None:
            placement["motion_latents"] = batch["sink_motion"].to(dtype)
        v = model(xt.to(dtype), t, text.to(dtype), audio=None if audio is None else audio.to(dtype),
                  causal=self.causal, reference=None if reference is None else reference.to(dtype), **placement)
        target = self.flow.velocity_target(x0, noise)
        squared = F.mse_loss(v.float(), target, reduction="none")   # [B, C, F, h, w]
        if self.config.mouth_weight > 0:
            # The audio decides only the mouth's few pixels; weighting them (as talking-head models weight a lip
            # mask) makes the audio route's share of the loss large enough to learn from.
            if batch.get("mouth_region") is None:
                raise ValueError("loss.mouth_weight > 0: the batch has no mouth_region (data=toy makes them)")
            squared = squared * (1.0 + self.config.mouth_weight * batch["mouth_region"].float()[:, None])
        per_frame = squared.mean(dim=(1, 3, 4))  # [B, F]
        if self.config.weighting == "bell":
            per_frame = per_frame * self.flow.training_weight(t)
        if first_frame:
            per_frame = per_frame[:, 1:]
        loss = per_frame.mean()
        with torch.no_grad():
            x0_err = (self.flow.x0_from_velocity(xt, v.float(), t) - x0).abs().mean()
        return loss, {"x0_error": x0_err, "mean_t": t.mean()}
