"""Stage 2's optional ODE initialisation (``distill.py distill.stage=ode_init``): regress the causal student onto the
teacher's sampling trajectories at the student's own steps, before DMD (CausVid's and StreamAvatar's recipe).

1. Trajectories (:func:`teacher_trajectory`, no gradient): from pure noise, the frozen bidirectional teacher with
   classifier-free guidance samples the whole clip with Euler steps of the flow ODE. The dense schedule is the
   student's step list (warped by ``distill.shift``) with each interval cut into ``ode.substeps`` equal pieces, so
   the trajectory passes exactly through the student's levels; the states there and the final clean clip are kept.
2. Regression (:func:`ode_regression_loss`): each block of the clip independently takes the trajectory's state at
   one of the student's steps (drawn per block), the student runs one block-causal forward over the clip with
   the streaming window and position policy it was trained with (as Diffusion Forcing does), and its clean
   estimate of every block is pulled onto the trajectory's end (MSE on ``x0``).

The student then starts DMD already a few-step sampler of the teacher's distribution.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from ..diffusion.flow import FlowSchedule
from ..engine.positions import PositionPolicy
from ..models import AvatarDiT, DiTConfig
from .dmd import DistillOptim, DistillSettings, NonFiniteError, derived_seed
from .dmd_loss import Conditions, DMDLoss, DMDLossConfig, batch_conditions
from .ema import ParameterEMA
from .roles import load_role


@dataclass
class ODESettings:
    """``ode.*`` keys."""

    substeps: int = 4       # teacher Euler steps per interval of the student's schedule

    def __post_init__(self):
        if self.substeps < 1:
            raise ValueError(f"ode.substeps must be at least 1, got {self.substeps}")


def dense_schedule(student_steps: torch.Tensor, substeps: int) -> tuple[torch.Tensor, list[int]]:
    """The teacher's timesteps ``[S * substeps + 1]`` (ending at 0) and the index of each student step in it.

    ``student_steps`` ``[S]`` are the warped timesteps of the student, decreasing from near 1000."""
    ends = torch.cat([student_steps.double(), torch.zeros(1, dtype=torch.float64)])
    pieces = [torch.linspace(float(ends[i]), float(ends[i + 1]), substeps + 1, dtype=torch.float64)[:-1]
              for i in range(len(student_steps))]
    dense = torch.cat(pieces + [torch.zeros(1, dtype=torch.float64)])
    return dense.float(), [i * substeps for i in range(len(student_steps))]


@torch.no_grad()
def teacher_trajectory(guided_x0, noise: torch.Tensor, dense: torch.Tensor, keep: list[int], flow: FlowSchedule
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``noise`` ``[B, C, F, H, W]`` along ``dense`` timesteps with Euler steps of the flow ODE.

    ``guided_x0(x_t, t [B])`` is the teacher's (guided) clean estimate. Returns the states at ``dense[keep]``
    ``[S, B, C, F, H, W]`` and the clean end ``[B, C, F, H, W]``."""
    x, kept = noise.float(), []
    b = x.shape[0]
    for i in range(len(dense) - 1):
        if i in keep:
            kept.append(x)
        t = dense[i].expand(b).to(x.device)
        x0 = guided_x0(x, t)
        sigma = flow.sigma(t).view(b, *([1] * (x.dim() - 1)))
        sigma_next = flow.sigma(dense[i + 1].expand(b).to(x.device)).view_as(sigma)
        # x_t = (1 - sigma) x0 + sigma eps: moving to sigma_next keeps the estimated x0 and eps.
        eps = (x - (1 - sigma) * x0) / sigma
        x = (1 - sigma_next) * x0 + sigma_next * eps
    return torch.stack(kept), x


def ode_regression_loss(student: AvatarDiT, states: torch.Tensor, target: torch.Tensor, student_steps: torch.Tensor,
                        cond: Conditions, positions: PositionPolicy | None, flow: FlowSchedule,
                        generator: torch.Generator) -> torch.Tensor:
    """MSE between the student's clean estimate and the trajectory's end ``target`` ``[B, C, F, H, W]``, each
    block taking the trajectory's state ``states [S, B, ...]`` at one student step drawn per block."""
    s_count, b, _, frames = states.shape[:4]
    f = student.config.frames_per_block
    if frames % f:
        raise ValueError(f"clips of {frames} latent frames do not split into blocks of {f}")
    device = states.device
    pick = torch.randint(s_count, (b, frames // f), generator=generator).repeat_interleave(f, dim=1).to(device)
    xt = _pick_states(states, pick)
    t = student_steps.to(device)[pick]                                       # [B, F]
    placement = {}
    if positions is not None:
        frame_pos, sink_pos = positions.training_positions(b, frames, generator, device)
        placement = dict(frame_pos=frame_pos, reference_pos=sink_pos[..., None], window_blocks=positions.window_blocks)
    dtype = next(student.parameters()).dtype
    audio = None if cond.audio is None or not student.config.has_audio else cond.audio.to(dtype)
    reference = None if cond.reference is None else cond.reference.to(dtype)
    if cond.sink_motion is not None:  # model.sink_motion: the sink's FramePack tokens, as the student streams
        placement["motion_latents"] = cond.sink_motion.to(dtype)
    v = student(xt.to(dtype), t, cond.text.to(dtype), audio=audio, causal=True, reference=reference, **placement)
    x0 = flow.x0_from_velocity(xt, v.float(), t)
    return F.mse_loss(x0, target.float())


def _pick_states(states: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """``states [S, B, C, F, H, W]`` indexed per clip and frame by ``pick [B, F]``: ``[B, C, F, H, W]``."""
    s, b, c, frames, h, w = states.shape
    index = pick[None, :, None, :, None, None].expand(1, b, c, frames, h, w)
    return torch.gather(states, 0, index).squeeze(0)


class ODEInitModule(L.LightningModule):
    """Regress the causal student (from Stage 1) onto the guided teacher's (Stage 0) trajectories.

    Args: as :class:`~liveavatar.training.dmd.DMDModule` (``distill.steps``/``shift`` give the student's steps,
    ``loss.guidance_scale`` the teacher's guidance, ``optim.generator_lr`` the learning rate), plus ``ode``.
    """

    def __init__(self, model: dict, generator_from: str | None, teacher_from: str | None, distill: dict,
                 loss: dict, optim: dict, ode: dict | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.dit_config = DiTConfig.from_dict(dict(model["dit"]))
        self.generator_from, self.teacher_from = generator_from, teacher_from
        self.settings = DistillSettings(**distill)
        self.guide = DMDLoss(DMDLossConfig(**loss))
        self.optim = DistillOptim(**optim)
        self.ode = ODESettings(**(ode or {}))
        self.seed = int(seed)
        self.positions = PositionPolicy.from_config(self.dit_config.frames_per_block,
                                                    self.dit_config.reference_position,
                                                    int(model.get("window_blocks", 3)), model.get("rope"))
        self.flow = FlowSchedule(self.settings.shift)
        self.student_steps = self.flow.warp([float(t) for t in self.settings.steps]).float()
        self.generator: AvatarDiT | None = None
        self.teacher: AvatarDiT | None = None
        self.ema: ParameterEMA | None = None

    def configure_model(self) -> None:
        if self.generator is not None:
            return
        self.generator = load_role(self.generator_from, self.dit_config)
        self.teacher = load_role(self.teacher_from, self.dit_config).eval().requires_grad_(False)
        if self.settings.ema_decay is not None:
            self.ema = ParameterEMA(self.generator, self.settings.ema_decay)

    @property
    def model(self) -> AvatarDiT:
        return self.generator

    def export(self) -> AvatarDiT:
        """The student to save (its EMA when enabled)."""
        if self.ema is None:
            return self.generator
        return self.ema.copy_to(copy.deepcopy(self.generator))

    def configure_optimizers(self):
        o = self.optim
        return torch.optim.AdamW(self.generator.parameters(), lr=o.generator_lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)

    def step_loss(self, batch: dict, step: int) -> torch.Tensor:
        """The regression loss of one batch at generator step ``step`` (trajectories drawn afresh)."""
        cond = batch_conditions(batch, self.dit_config)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, self.global_rank))
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        dense, keep = dense_schedule(self.student_steps, self.ode.substeps)
        states, target = teacher_trajectory(lambda x, t: self.guide.real_x0(self.teacher, x, t, cond), noise, dense,
                                            keep, self.flow)
        return ode_regression_loss(self.generator, states, target, self.student_steps, cond, self.positions,
                                   self.flow, generator)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        loss = self.step_loss(batch, self.global_step)
        self.manual_backward(loss)
        max_norm = self.optim.clip_grad_norm if self.optim.clip_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), max_norm)
        if not bool(torch.isfinite(loss.detach()) & torch.isfinite(norm)):  # the step's one host sync
            raise NonFiniteError(f"non-finite ODE-init loss or gradient at step {self.global_step}: stopped before "
                                 "the optimizer step, so no checkpoint holds it (try a lower optim.generator_lr)")
        opt.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        self.log("train/ode_loss", loss.detach(), prog_bar=True, batch_size=batch["latents"].shape[0])
