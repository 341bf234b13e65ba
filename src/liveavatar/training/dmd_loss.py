"""Stage 2's losses: Distribution Matching Distillation (DMD) or Score identity Distillation (SiD) for the
generator, and the flow-matching loss of the critic (the "fake score").

Both score models are bidirectional full-sequence forwards of :class:`~liveavatar.models.dit.AvatarDiT` over the
whole rolled-out clip, conditioned on the clip's reference, audio and text.

- The **real score** is the frozen teacher with classifier-free guidance: ``real = cond + g (cond - uncond)``,
  where ``uncond`` zeroes the text and the audio (what the Stage 0/1 condition dropout trained; the reference is
  kept). Guidance is applied to the clean estimates ``x0``; ``x0 = x_t - sigma v`` is affine in ``v``, so this is
  the same as guiding the velocity.
- The **fake score** (critic) is unguided.
- DMD gradient: the generated video ``x`` is re-noised to one timestep per clip, and
  ``grad = (fake_x0 - real_x0) / mean_{C,F,H,W} |x - real_x0|`` (per clip, non-finite values zeroed). The
  generator's loss ``0.5 * mean((x - (x - grad).detach())^2)``, in float64, has the gradient ``grad / numel``
  with respect to ``x``: the generator is pushed from where the critic thinks its samples are toward where the
  teacher thinks real data is.
- SiD (``distill.loss=sid``, StreamAvatar's Stage 1; Zhou et al. 2024): at the same re-noised ``x_t``, the loss
  ``mean((real - fake) * ((real - x) - alpha (real - fake)) / w)`` with ``w = mean_{C,F,H,W} |x - real|``
  (per clip, held constant), differentiated through both score networks (their weights held fixed) as well as
  through ``x``: where DMD stops the gradient at the scores, SiD follows the identity that links them to ``x``.
  ``alpha`` (``loss.sid_alpha``, 1.2 in the SiD paper) weighs the ``|real - fake|^2`` term.
- The critic learns the generator's distribution with the flow-matching loss on detached generator samples.

Timesteps of both losses: a uniform unshifted level in ``[min_t, max_t]`` mapped through the shifted table, so
neither score is queried at pure noise or at the clean end, where the difference carries no signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..diffusion.flow import FlowSchedule
from ..models.audio import group_for_family
from ..models.dit import AvatarDiT


@dataclass
class DMDLossConfig:
    """``loss.*`` keys of ``conf/distill.yaml``."""

    guidance_scale: float = 3.0     # classifier-free guidance of the real score (0: the conditional score)
    sid_alpha: float = 1.2          # SiD only: weight of the -|real - fake|^2 term
    shift: float = 5.0              # shift of the schedule the DMD and critic timesteps are drawn from
    min_t: int = 20                 # unshifted range of those timesteps (of 1000)
    max_t: int = 980

    def __post_init__(self):
        if not 0 <= self.min_t <= self.max_t < 1000:
            raise ValueError(f"loss.min_t and loss.max_t must satisfy 0 <= min_t <= max_t < 1000, "
                             f"got {self.min_t} and {self.max_t}")
        if self.guidance_scale < 0:
            raise ValueError(f"loss.guidance_scale must not be negative, got {self.guidance_scale}")


@dataclass
class Conditions:
    """A batch's conditioning: ``text [B, L, text_dim]``, ``audio`` grouped by latent frame
    ``[B, F, per_latent, layers, feat]`` (or None), ``reference [B, C, 1, H, W]`` (or None), and the sink's motion
    latents ``[B, C, K, H, W]`` (``model.sink_motion``; or None)."""

    text: torch.Tensor
    audio: torch.Tensor | None
    reference: torch.Tensor | None
    sink_motion: torch.Tensor | None = None

    def unconditional(self) -> "Conditions":
        """Text and audio zeroed, the reference kept: the dropped-out input of Stage 0/1."""
        audio = None if self.audio is None else torch.zeros_like(self.audio)
        return Conditions(torch.zeros_like(self.text), audio, self.reference, self.sink_motion)

    @staticmethod
    def cat(a: "Conditions", b: "Conditions") -> "Conditions":
        """Both along the batch (one forward for the conditional and unconditional halves)."""
        audio = None if a.audio is None else torch.cat([a.audio, b.audio])
        reference = None if a.reference is None else torch.cat([a.reference, b.reference])
        motion = None if a.sink_motion is None else torch.cat([a.sink_motion, b.sink_motion])
        return Conditions(torch.cat([a.text, b.text]), audio, reference, motion)


def batch_conditions(batch: dict, config) -> Conditions:
    """A training batch's text, audio (grouped by latent frame) and reference as the models of ``config``
    (a :class:`DiTConfig`) take them; the clips must split into whole blocks."""
    frames = batch["latents"].shape[2]
    if frames % config.frames_per_block:
        raise ValueError(f"clips of {frames} latent frames do not split into the rollout's blocks of "
                         f"{config.frames_per_block}")
    audio = batch.get("audio") if config.has_audio else None
    if audio is not None:
        audio = group_for_family(audio, frames, config.video_frames_per_latent, config.family)
    reference = batch.get("reference") if config.reference != "none" else None
    motion = batch.get("sink_motion") if config.reference == "sink" else None
    return Conditions(batch["text"], audio, reference, motion)


def sid_generator_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float) -> torch.Tensor:
    """Score identity Distillation's generator loss, a scalar (mean over all elements, float64):
    ``(real - fake) * ((real - x) - alpha (real - fake)) / w`` with ``w = mean_{C,F,H,W} |x - real|`` per clip
    (detached, at least 1e-5). ``x`` is the generated video, ``real_x0``/``fake_x0`` the scores' clean estimates at
    its re-noised version; all ``[B, C, F, H, W]``, with their graphs."""
    x, real, fake = x.double(), real_x0.double(), fake_x0.double()
    with torch.no_grad():
        w = (x - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-5)
    diff = real - fake
    return (diff * ((real - x) - alpha * diff) / w).mean()


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """``(fake_x0 - real_x0) / mean |x - real_x0|`` with the mean per clip over ``C, F, H, W``; all ``[B, C, F, H, W]``.
    float64; non-finite entries (a zero normaliser) become 0."""
    x, real, fake = x.double(), real_x0.double(), fake_x0.double()
    normaliser = (x - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((fake - real) / normaliser, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_generator_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * MSE(x, (x - grad).detach())`` in float64: a scalar whose gradient with respect to ``x`` is
    ``grad / x.numel()``."""
    x = x.double()
    return 0.5 * F.mse_loss(x, (x - grad.double()).detach(), reduction="mean")


class DMDLoss:
    """The scores and losses of a DMD step, on models passed in (the module owns them).

    Args:
        config: the ``loss.*`` settings.
    """

    def __init__(self, config: DMDLossConfig):
        self.config = config
        self.flow = FlowSchedule(config.shift)

    def sample_timesteps(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """One timestep per clip ``[B]``: an unshifted level drawn uniformly in ``[min_t, max_t]``, shifted."""
        c, T = self.config, self.flow.num_train_timesteps
        level = torch.randint(c.min_t, c.max_t + 1, (batch,), generator=generator)
        return self.flow.timesteps[(T - level).clamp(0, T - 1)].float().to(device)

    def draw(self, x: torch.Tensor, generators: torch.Generator | Sequence[torch.Generator]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """A timestep ``[B]`` and a noise like ``x`` per clip. With one generator per clip, each clip's draws come
        from its own stream, so a clip gets the same draws whichever rank holds it and whatever the batch size
        (a run split over ranks reproduces the one-process run); one generator serves the whole batch in order."""
        if isinstance(generators, torch.Generator):
            t = self.sample_timesteps(x.shape[0], generators, x.device)
            return t, torch.randn(x.shape, generator=generators).to(device=x.device, dtype=x.dtype)
        if len(generators) != x.shape[0]:
            raise ValueError(f"{len(generators)} random streams for {x.shape[0]} clips")
        ts, noises = [], []
        for g in generators:
            ts.append(self.sample_timesteps(1, g, x.device))
            noises.append(torch.randn((1, *x.shape[1:]), generator=g))
        return torch.cat(ts), torch.cat(noises).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def velocity(model: AvatarDiT, xt: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Bidirectional full-sequence velocity ``[B, C, F, H, W]`` (float32) of ``model`` at ``xt``, ``t [B]``."""
        dtype = next(model.parameters()).dtype
        audio = None if cond.audio is None or not model.config.has_audio else cond.audio.to(dtype)
        reference = None if cond.reference is None else cond.reference.to(dtype)
        motion = None if cond.sink_motion is None else cond.sink_motion.to(dtype)
        return model(xt.to(dtype), t, cond.text.to(dtype), audio=audio, causal=False, reference=reference,
                     motion_latents=motion)

    def real_x0(self, teacher: AvatarDiT, xt: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The teacher's guided clean estimate ``cond + g (cond - uncond)`` ``[B, C, F, H, W]`` (float32); one
        forward over the conditional and unconditional halves together."""
        g = self.config.guidance_scale
        if g == 0:
            return self.flow.x0_from_velocity(at_least_float32(xt), self.velocity(teacher, xt, t, cond), t)
        both = Conditions.cat(cond, cond.unconditional())
        v = self.velocity(teacher, torch.cat([xt, xt]), torch.cat([t, t]), both)
        x0 = self.flow.x0_from_velocity(at_least_float32(torch.cat([xt, xt])), v, torch.cat([t, t]))
        x0_cond, x0_uncond = x0.chunk(2)
        return x0_cond + g * (x0_cond - x0_uncond)

    def fake_x0(self, critic: AvatarDiT, xt: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The critic's unguided clean estimate ``[B, C, F, H, W]`` (float32)."""
        return self.flow.x0_from_velocity(at_least_float32(xt), self.velocity(critic, xt, t, cond), t)

    @torch.no_grad()
    def gradient(self, teacher: AvatarDiT, critic: AvatarDiT, x: torch.Tensor, cond: Conditions,
                 generator: torch.Generator | Sequence[torch.Generator]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DMD gradient ``[B, C, F, H, W]`` (float64) at the generated video ``x`` (detached here), re-noised at
        one drawn timestep per clip, and statistics for logging."""
        x = x.detach()
        t, noise = self.draw(x, generator)
        xt = self.flow.add_noise(x, noise, t)
        real = self.real_x0(teacher, xt, t, cond)
        fake = self.fake_x0(critic, xt, t, cond)
        return dmd_gradient(x, real, fake), {"dmd_t": t.mean(), "real_fake_gap": (real - fake).abs().mean()}

    def sid_loss(self, teacher: AvatarDiT, critic: AvatarDiT, x: torch.Tensor, cond: Conditions,
                 generator: torch.Generator | Sequence[torch.Generator]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SiD's generator loss at the generated video ``x`` ``[B, C, F, H, W]`` (kept in the graph: the loss is
        differentiated through both scores into ``x``; the caller keeps the scores' weights out of it), re-noised at
        one drawn timestep per clip, and statistics for logging."""
        t, noise = self.draw(x.detach(), generator)
        xt = self.flow.add_noise(x, noise, t)
        real = self.real_x0(teacher, xt, t, cond)
        fake = self.fake_x0(critic, xt, t, cond)
        loss = sid_generator_loss(x, real, fake, self.config.sid_alpha)
        return loss, {"dmd_t": t.mean(), "real_fake_gap": (real - fake).detach().abs().mean()}

    def critic_loss(self, critic: AvatarDiT, x: torch.Tensor, cond: Conditions,
                    generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
        """Flow-matching loss of the critic on generated clips ``x`` ``[B, C, F, H, W]`` (detached here): predict
        ``noise - x`` from ``x`` noised at one drawn timestep per clip. A scalar (float32 at least)."""
        x = at_least_float32(x.detach())
        t, noise = self.draw(x, generator)
        v = self.velocity(critic, self.flow.add_noise(x, noise, t), t, cond)
        return F.mse_loss(v.to(x.dtype), self.flow.velocity_target(x, noise))
