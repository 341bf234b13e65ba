"""``AdversarialModule``: StreamAvatar's adversarial refinement (``distill.py stage=adversarial``).

The Stage 2 loop with the critic replaced by a :class:`~liveavatar.training.discriminator.ConsistencyDiscriminator`
and the teacher gone. Everything about the generator is Stage 2's: the same rollout (engine step function, history
mode, sink, position policy, exit step), one-shot or block-wise backward, EMA, NaN checks, checkpoints.

- **Discriminator step** (``critic_steps_per_generator_step`` of them): real clips of the batch and the generator's
  rollouts for the same conditioning, both noised at one drawn timestep per clip (``loss.*``'s range), scored by the
  discriminator; the loss is the relativistic ``softplus(-(D(real) - D(fake)))`` (per frame for the local branch,
  per video for the global one) plus ``adversarial.gamma / 2 * (R1 + R2)``: the squared gradient norms of the
  discriminator's output with respect to its real and its fake inputs (exact, by double backward through PyTorch's
  math attention kernel, the only one with a second derivative, which materialises the attention matrices; or
  ``adversarial.penalty=approx``: finite differences with the fused kernels, what a large model needs).
- **Generator step**: ``softplus(-(D(fake) - D(real)))`` with the discriminator's weights held fixed, differentiated
  through the discriminator into the rolled-out video.

The discriminator's backbone starts from ``teacher_from``; it is frozen (``lora.rank=0``: only the Q-Formers and
the heads train) or trained through a ``discriminator`` LoRA adapter (``lora.rank>0``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import AvatarDiT
from .discriminator import ConsistencyDiscriminator, Logits, approximate_penalty, gradient_penalty, relativistic_loss
from .dmd import LOSS, DMDModule, derived_seed, held_fixed
from .dmd_loss import Conditions
from .lora import apply_lora
from .roles import load_role

PENALTIES = ("exact", "approx")


@dataclass
class AdversarialSettings:
    """``adversarial.*`` keys."""

    taps: list[int] | None = None      # backbone blocks read by the Q-Formers (null: num_qformers spread evenly)
    num_qformers: int = 3              # N_Q when taps is null
    queries: int = 1                   # learnable queries per frame and Q-Former
    local_branch: bool = True          # per-frame realism logits
    global_branch: bool = True         # per-video consistency with the reference
    gamma: float = 1.0                 # weight of (R1 + R2) / 2
    penalty: str = "exact"             # exact (double backward) | approx (finite differences)
    penalty_sigma: float = 0.01        # approx: the perturbation's scale

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"adversarial.penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.gamma < 0:
            raise ValueError(f"adversarial.gamma must not be negative, got {self.gamma}")

    def tap_blocks(self, layers: int) -> list[int]:
        """The tapped blocks of a backbone of ``layers`` blocks: ``taps``, or ``num_qformers`` spread over the depth
        (the last one at the final block)."""
        if self.taps is not None:
            return list(self.taps)
        n = min(self.num_qformers, layers)
        return sorted({round((k + 1) * layers / n) - 1 for k in range(n)})


class AdversarialModule(DMDModule):
    """Adversarial refinement of the causal generator against real clips (see the module docstring).

    Args: as :class:`~liveavatar.training.dmd.DMDModule`, plus ``adversarial`` (:class:`AdversarialSettings`).
    ``generator_from`` is the distilled student (Stage 2's export), ``teacher_from`` the discriminator's backbone.
    """

    def __init__(self, model: dict, generator_from: str | None, teacher_from: str | None, distill: dict,
                 loss: dict, optim: dict, lora: dict | None = None, adversarial: dict | None = None,
                 gradient_checkpointing: bool = False, seed: int = 0, drill: tuple[str, int] | None = None):
        super().__init__(model, generator_from, teacher_from, distill, loss, optim, lora, gradient_checkpointing,
                         seed, drill)
        self.adversarial = AdversarialSettings(**(adversarial or {}))

    def build_roles(self) -> tuple[AvatarDiT, ConsistencyDiscriminator, None]:
        generator = load_role(self.generator_from, self.dit_config)
        backbone = load_role(self.teacher_from, self.dit_config)
        if self.lora.enabled:
            apply_lora(generator, self.lora, adapter_name="generator", train_additions=True)
            apply_lora(backbone, self.lora, adapter_name="discriminator", train_additions=False)
        else:
            backbone.requires_grad_(False)
        for model in (generator, backbone):
            model.gradient_checkpointing = self.gradient_checkpointing
        a = self.adversarial
        discriminator = ConsistencyDiscriminator(backbone, a.tap_blocks(self.dit_config.num_layers), a.queries,
                                                 a.local_branch, a.global_branch)
        return generator, discriminator, None

    @property
    def real_score(self):
        raise AttributeError("stage=adversarial has no teacher score")

    # ------------------------------------------------------------------------------------------ scoring
    def discriminate(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditions) -> Logits:
        """Logits of noised clips ``xt`` ``[B, C, F, H, W]`` at ``t`` ``[B]`` with their conditioning."""
        disc = self.critic
        dtype = next(disc.parameters()).dtype
        audio = None if cond.audio is None or not self.dit_config.has_audio else cond.audio.to(dtype)
        reference = None if cond.reference is None else cond.reference.to(dtype)
        motion = None if cond.sink_motion is None else cond.sink_motion.to(dtype)
        return disc(xt.to(dtype), t, cond.text.to(dtype), audio, reference, motion)

    def noised_pair(self, real: torch.Tensor, fake: torch.Tensor, generators: list[torch.Generator]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Real and fake clips ``[B, C, F, H, W]`` noised at one timestep per clip, the same for both sides (a
        relativistic pair compares like with like), each with its own noise; returns ``t``, the two noised clips."""
        t = torch.cat([self.loss_fn.sample_timesteps(1, g, real.device) for g in generators])
        noise = [torch.cat([torch.randn((1, *real.shape[1:]), generator=g) for g in generators]).to(real)
                 for _ in range(2)]
        flow = self.loss_fn.flow
        return t, flow.add_noise(real, noise[0], t), flow.add_noise(fake, noise[1], t)

    def critic_loss(self, batch: dict, cond: Conditions, step: int, substep: int) -> torch.Tensor:
        """The discriminator's loss on the batch's real clips and freshly rolled-out fakes (no generator gradient)."""
        exit_step = self.exit_step(step, substep)
        with torch.no_grad():
            fake = torch.cat([r.run(audio, exit_step)[0] for r, audio in self.rollouts(batch, cond, step, substep)])
        a = self.adversarial
        gens = self.loss_generators(step, substep, fake.shape[0])
        t, real_t, fake_t = self.noised_pair(batch["latents"].to(fake), fake, gens)
        real_t, fake_t = real_t.requires_grad_(a.penalty == "exact"), fake_t.requires_grad_(a.penalty == "exact")
        # The exact penalty differentiates the input gradient once more: only PyTorch's math attention kernel has
        # that second derivative (the fused kernels do not), at the cost of materialising the attention matrices.
        kernels = sdpa_kernel([SDPBackend.MATH]) if a.penalty == "exact" and a.gamma > 0 else contextlib.nullcontext()
        with kernels:
            real_logits, fake_logits = self.discriminate(real_t, t, cond), self.discriminate(fake_t, t, cond)
        loss = relativistic_loss(real_logits, fake_logits)
        if a.gamma > 0:
            if a.penalty == "exact":
                r1, r2 = gradient_penalty(real_logits, real_t), gradient_penalty(fake_logits, fake_t)
            else:
                g = torch.Generator().manual_seed(derived_seed(self.seed, step, substep, LOSS, 1))
                again = lambda x: self.discriminate(x, t, cond)  # noqa: E731
                r1 = approximate_penalty(again, real_t, real_logits, a.penalty_sigma, g)
                r2 = approximate_penalty(again, fake_t, fake_logits, a.penalty_sigma, g)
            loss = loss + a.gamma / 2 * (r1 + r2)
        return loss

    def video_loss(self, video: torch.Tensor, batch: dict, cond: Conditions, generators) -> tuple[torch.Tensor, dict]:
        """The generator's relativistic loss ``softplus(-(D(fake) - D(real)))`` at the rolled-out ``video``,
        differentiated through the discriminator (held fixed) into it."""
        t, real_t, fake_t = self.noised_pair(batch["latents"].to(video), video, generators)
        with held_fixed(self.critic):
            with torch.no_grad():
                real_logits = self.discriminate(real_t, t, cond)
            fake_logits = self.discriminate(fake_t, t, cond)
        loss = relativistic_loss(fake_logits, real_logits)
        stats = {"d_real": real_logits.total().detach().mean(), "d_fake": fake_logits.total().detach().mean()}
        return loss, stats
