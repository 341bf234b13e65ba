"""``DMDModule``: the LightningModule of Stage 2 (Self-Forcing DMD distillation).

One training step is one *generator* step, preceded by ``critic_steps_per_generator_step`` critic steps:

1. critic steps: roll the generator out over the batch's clips without gradient, then train the critic with the
   flow-matching loss on those samples (:meth:`DMDLoss.critic_loss`);
2. generator step: roll the generator out through :class:`SelfForcingRollout` (one exit step for the whole
   iteration), compute the generator's loss at the rolled-out video with the teacher (guided) and the critic (DMD,
   or SiD with ``distill.loss=sid``: differentiated through both scores), and back-propagate it through the
   rollout, one-shot or block by block (``distill.blockwise``): block by block, the loss's gradient at the video is
   taken first and then pushed into each block's exit forward.

Optimization is manual (two optimizers). Lightning's ``global_step`` counts the optimizer steps taken through
its own optimizer wrappers: the generator steps through one, the critic through the bare optimizer, so
``global_step``, checkpoint names and ``trainer.max_steps`` count generator steps.

Randomness is derived from ``(seed, generator step, sub-step, purpose, clip)``: the exit step is the same on every
rank; each clip gets its own rollout and loss noise, keyed by its global index, so a run split over N ranks
equals one process with N times the batch (tested); a resumed run draws what the uninterrupted one would.

Each optimizer step checks once (one host sync) that the loss and the gradient norm are finite, and otherwise
stops with :class:`NonFiniteError` before stepping, so no non-finite weight reaches a checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from ..engine.stream import EngineSettings, StreamCore
from ..models import AvatarDiT, DiTConfig
from .dmd_loss import Conditions, DMDLoss, DMDLossConfig, batch_conditions, dmd_generator_loss
from .ema import ParameterEMA
from .lora import LoraSettings, apply_lora, merged_copy
from .roles import TeacherView, build_roles
from .rollout import RolloutSettings, SelfForcingRollout
from .sharding import gathered, local_norm, mesh_of, shard_dit

# What a derived random stream is for (part of its seed).
EXIT, NOISE, LOSS = 0, 1, 2


class NonFiniteError(RuntimeError):
    """A loss or gradient is NaN or infinite (one line for the user)."""


@dataclass
class DistillSettings:
    """``distill.*`` keys."""

    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # the student's steps
    shift: float = 5.0                  # shift the steps are warped with (as the student will stream)
    history: str = "corrupt"            # corrupt | clean | fixed_noise (see training/rollout.py)
    context_noise: float = 0.0          # clean: timestep of the cache-writing re-forward
    fixed_noise_t: float = 557.0        # fixed_noise: timestep the cache is written at
    blockwise: bool = True              # block-wise gradient accumulation (Algorithm 2) instead of one-shot
    critic_steps_per_generator_step: int = 5
    ema_decay: float | None = 0.99      # generator EMA, exported as the final model; null: off
    sink: str = "aas"                   # none | reference | aas (as the student will stream)
    sink_switch_block: int | None = None
    loss: str = "dmd"                   # the generator's loss: dmd | sid (Score identity Distillation)

    def __post_init__(self):
        if self.loss not in GENERATOR_LOSSES:
            raise ValueError(f"distill.loss must be one of {', '.join(GENERATOR_LOSSES)}, got {self.loss!r}")
        if self.critic_steps_per_generator_step < 0:
            raise ValueError("distill.critic_steps_per_generator_step must not be negative, "
                             f"got {self.critic_steps_per_generator_step}")


@contextlib.contextmanager
def held_fixed(*modules: torch.nn.Module | None):
    """Inside, the modules' parameters take no gradient (a loss may still be differentiated through them); the
    trainable ones become trainable again on exit. Autograd decides at forward time, so the forward suffices."""
    trainable = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class DistillOptim:
    """``optim.*`` keys: one AdamW per trained role."""

    generator_lr: float = 1e-5
    critic_lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad_norm: float | None = 10.0   # per role; null: no clipping (the norm is still checked)


GENERATOR_LOSSES = ("dmd", "sid")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


class DMDModule(L.LightningModule):
    """Distil a causal few-step generator from a Stage 1 model with a bidirectional teacher.

    Args:
        model: ``dit`` (a dict of :class:`DiTConfig` fields), ``window_blocks`` and ``rope`` (the streaming
            window and position policy, shared with inference).
        generator_from, teacher_from: checkpoints of the Stage 1 student and of the Stage 0 teacher (None: fresh
            weights, for tests).
        distill, loss, optim, lora: the ``distill.*``, ``loss.*``, ``optim.*``, ``lora.*`` keys.
        gradient_checkpointing: recompute each block in the backward pass (generator and critic).
        seed: root of every random stream of the run.
        drill: ``(role, step)``: make that role's loss NaN at that generator step (fault drill).
    """

    def __init__(self, model: dict, generator_from: str | None, teacher_from: str | None, distill: dict,
                 loss: dict, optim: dict, lora: dict | None = None, gradient_checkpointing: bool = False,
                 seed: int = 0, drill: tuple[str, int] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["drill"])
        self.automatic_optimization = False
        self.dit_config = DiTConfig.from_dict(dict(model["dit"]))
        self.generator_from, self.teacher_from = generator_from, teacher_from
        self.settings = DistillSettings(**distill)
        self.loss_fn = DMDLoss(DMDLossConfig(**loss))
        self.optim = DistillOptim(**optim)
        self.lora = LoraSettings(**(lora or {}))
        self.gradient_checkpointing, self.seed, self.drill = gradient_checkpointing, int(seed), drill
        s, rope = self.settings, dict(model.get("rope") or {})
        self.rollout_settings = RolloutSettings(s.history, s.context_noise, s.fixed_noise_t)
        self.engine_settings = EngineSettings(
            steps=[float(t) for t in s.steps], shift=s.shift, sink=s.sink, sink_switch_block=s.sink_switch_block,
            window_blocks=int(model.get("window_blocks", 3)), rope_policy=rope.get("policy", "rolling"),
            rapr_distance=int(rope.get("max_distance", 10)), rolling_offset=rope.get("rolling_offset"),
            sink_motion=bool(model.get("sink_motion", False)))
        self.generator: AvatarDiT | None = None
        self.critic: AvatarDiT | None = None
        self.teacher: AvatarDiT | None = None
        self.ema: ParameterEMA | None = None

    # ------------------------------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.generator is not None:
            return
        self.generator, self.critic, self.teacher = self.build_roles()
        mesh = mesh_of(self)
        if mesh is not None:  # trainer=fsdp: each role sharded block by block (the frozen teacher too)
            for role in (self.generator, self.critic, self.teacher):
                if role is not None:
                    shard_dit(getattr(role, "backbone", role), mesh, self.trainer.precision)
        if self.settings.ema_decay is not None:
            self.ema = ParameterEMA(self.generator, self.settings.ema_decay)

    def build_roles(self) -> tuple[AvatarDiT, torch.nn.Module, AvatarDiT | None]:
        """The generator, the critic and (full weights) the teacher, with their trainable flags set."""
        roles = build_roles(self.dit_config, self.generator_from, self.teacher_from, self.lora,
                            self.gradient_checkpointing)
        return roles.generator, roles.critic, roles.teacher

    @property
    def model(self) -> AvatarDiT:
        """The model this stage trains and exports (the generator)."""
        return self.generator

    @property
    def real_score(self):
        """The teacher: its own model, or the shared LoRA base with the critic's adapters off."""
        return self.teacher if self.teacher is not None else TeacherView(self.critic)

    def export(self) -> AvatarDiT | None:
        """The generator to save (its EMA when enabled), with plain Wan2.1 parameter names (LoRA merged). Sharded,
        it is gathered: every rank must call this, and only global rank 0 gets the model (the others None)."""
        generator = gathered(self.generator, self._plain_generator)
        if generator is None:
            return None
        if self.ema is not None:
            generator = self.ema.copy_to(copy.deepcopy(generator))
        return merged_copy(generator) if self.lora.enabled else generator

    def _plain_generator(self) -> AvatarDiT:
        """An unsharded model with the generator's structure (its LoRA adapters included)."""
        model = AvatarDiT(self.dit_config)
        if self.lora.enabled:
            apply_lora(model, self.lora, adapter_name="generator", train_additions=True)
        return model

    def configure_optimizers(self):
        o = self.optim

        def adamw(model, lr):
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

        return [adamw(self.generator, o.generator_lr), adamw(self.critic, o.critic_lr)]

    # ------------------------------------------------------------------------------------------ inputs
    def conditions(self, batch: dict) -> Conditions:
        """The batch's text, audio (grouped by latent frame) and reference, as the models take them."""
        return batch_conditions(batch, self.dit_config)

    def _rank(self) -> int:
        return self.global_rank if self._trainer is not None else 0

    def exit_step(self, step: int, substep: int) -> int:
        """The exit step of sub-step ``substep`` of generator step ``step``: the same on every rank."""
        rng = np.random.default_rng(derived_seed(self.seed, step, substep, EXIT))
        return int(rng.integers(len(self.engine_settings.steps)))

    def loss_generators(self, step: int, substep: int, clips: int) -> list[torch.Generator]:
        """The random streams of a loss's timesteps and noise, one per clip of this rank, keyed by the clip's
        global index (as the rollout noise is): a run over N ranks draws what one process with N times the batch
        draws."""
        first = self._rank() * clips
        return [torch.Generator().manual_seed(derived_seed(self.seed, step, substep, LOSS, first + i))
                for i in range(clips)]

    def rollouts(self, batch: dict, cond: Conditions, step: int, substep: int
                 ) -> list[tuple[SelfForcingRollout, list[torch.Tensor | None]]]:
        """One rollout per clip (a fresh one-lane :class:`StreamCore` with its own noise seed) and its audio per
        block ``[1, F_block, per_latent, layers, feat]``."""
        b, c, frames, h, w = batch["latents"].shape
        f = self.dit_config.frames_per_block
        out = []
        for i in range(b):
            seed = derived_seed(self.seed, step, substep, NOISE, self._rank() * b + i)
            reference = None if cond.reference is None else cond.reference[i : i + 1]
            motion = None if cond.sink_motion is None else cond.sink_motion[i : i + 1]
            core = StreamCore(self.generator, self.engine_settings, (c, h, w), cond.text[i : i + 1], reference,
                              seed=seed, lanes=1, sink_motion=motion)
            audio = [None if cond.audio is None else cond.audio[i : i + 1, k : k + f] for k in range(0, frames, f)]
            out.append((SelfForcingRollout(core, self.rollout_settings), audio))
        return out

    # ------------------------------------------------------------------------------------------ losses
    def critic_loss(self, batch: dict, cond: Conditions, step: int, substep: int) -> torch.Tensor:
        """Flow-matching loss of the critic on freshly generated clips (rolled out without gradient)."""
        exit_step = self.exit_step(step, substep)
        with torch.no_grad():
            video = torch.cat([r.run(audio, exit_step)[0] for r, audio in self.rollouts(batch, cond, step, substep)])
        generators = self.loss_generators(step, substep, batch["latents"].shape[0])
        return self.loss_fn.critic_loss(self.critic, video, cond, generators)

    def generator_backward(self, batch: dict, cond: Conditions, step: int) -> tuple[torch.Tensor, dict]:
        """Roll out with gradient, compute the DMD loss and back-propagate it into the generator's ``.grad``.
        Returns the (detached) loss and statistics."""
        substep = self.settings.critic_steps_per_generator_step  # after the critic's sub-steps
        exit_step = self.exit_step(step, substep)
        rollouts = self.rollouts(batch, cond, step, substep)
        generators = self.loss_generators(step, substep, batch["latents"].shape[0])
        if not self.settings.blockwise:
            video = torch.cat([r.run(audio, exit_step)[0] for r, audio in rollouts])
            loss, stats = self.video_loss(video, batch, cond, generators)
            loss = self._drill("generator", step, loss)
            self._backward(loss)
            return loss.detach(), stats
        with torch.no_grad():
            runs = [r.run(audio, exit_step, keep_graph=False) for r, audio in rollouts]
        leaf = torch.cat([v for v, _ in runs]).detach().requires_grad_(True)
        with torch.enable_grad():
            loss, stats = self.video_loss(leaf, batch, cond, generators)
            loss = self._drill("generator", step, loss)
            (grad_video,) = torch.autograd.grad(loss, leaf)
        for i, ((rollout, _), (_, records)) in enumerate(zip(rollouts, runs)):
            rollout.backward_blockwise(records, exit_step, grad_video[i : i + 1])
        return loss.detach(), stats

    def video_loss(self, video: torch.Tensor, batch: dict, cond: Conditions, generators) -> tuple[torch.Tensor, dict]:
        """The generator's loss as a function of the rolled-out ``video`` ``[B, C, F, H, W]`` (its graph kept; the
        ``batch`` it was rolled out for) and statistics: DMD's surrogate (the scores' difference, taken without gradient), or SiD's (differentiated
        through the teacher and the critic, whose weights take no gradient from it)."""
        if self.settings.loss == "sid":
            with held_fixed(self.critic, self.teacher):
                return self.loss_fn.sid_loss(self.real_score, self.critic, video, cond, generators)
        grad, stats = self.loss_fn.gradient(self.real_score, self.critic, video, cond, generators)
        return dmd_generator_loss(video, grad), stats

    def _backward(self, loss: torch.Tensor) -> None:
        """Through Lightning's precision and strategy when a trainer runs the module, else plainly (tests)."""
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _drill(self, role: str, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.drill is not None and self.drill == (role, step):
            return loss * float("nan")
        return loss

    # ---------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = self.global_step
        generator_opt = self.optimizers()[0]                      # counted: advances global_step
        critic_opt = self.optimizers(use_pl_optimizer=False)[1]   # not counted
        cond = self.conditions(batch)
        critic_loss = None
        for k in range(self.settings.critic_steps_per_generator_step):
            critic_opt.zero_grad(set_to_none=True)
            critic_loss = self._drill("critic", step, self.critic_loss(batch, cond, step, k))
            self._backward(critic_loss)
            self._step(critic_opt, self.critic, "critic", step, critic_loss)
        critic_opt.zero_grad(set_to_none=True)  # only the role being stepped holds gradients

        generator_opt.zero_grad(set_to_none=True)
        loss, stats = self.generator_backward(batch, cond, step)
        self._step(generator_opt, self.generator, "generator", step, loss)
        if self.ema is not None:
            self.ema.update(self.generator)

        b = batch["latents"].shape[0]
        self.log("train/generator_loss", loss.float(), prog_bar=True, batch_size=b)
        if critic_loss is not None:
            self.log("train/critic_loss", critic_loss.detach(), prog_bar=True, batch_size=b)
        for key, value in stats.items():
            self.log(f"train/{key}", value, batch_size=b)

    def _step(self, optimizer, model: torch.nn.Module, role: str, step: int, loss: torch.Tensor) -> None:
        """Clip the role's gradients, check the loss and the gradient norm (the step's one host sync) and step."""
        norm = self._clip(model)
        if not bool(torch.isfinite(loss.detach()).all() & torch.isfinite(norm)):
            raise NonFiniteError(f"non-finite {role} loss or gradient at generator step {step}: stopped before the "
                                 f"{role}'s optimizer step, so no checkpoint holds it (try a lower optim.{role}_lr)")
        optimizer.step()

    def _clip(self, model: torch.nn.Module) -> torch.Tensor:
        """Clip to ``optim.clip_grad_norm`` (or only measure, when null); returns the total norm before clipping.
        Sharded (FSDP2), the gradients are DTensor shards and the norm is taken across the ranks."""
        max_norm = self.optim.clip_grad_norm if self.optim.clip_grad_norm is not None else float("inf")
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return local_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
