"""Flow matching as Wan2.1 and its causal distillations use it.

Conventions: ``sigma`` in [0, 1] is the noise fraction, timesteps are ``t = 1000 * sigma`` (the DiT's input),
``x_t = (1 - sigma) x0 + sigma * noise`` and the model predicts the velocity ``v = noise - x0``, so
``x0 = x_t - sigma * v``. Shift ``k`` maps ``s -> k s / (1 + (k - 1) s)``, spending more steps at high noise.
Timesteps ``t`` may be ``[B]`` (one level per clip) or ``[B, F]`` (one per latent frame) for latents
``[B, C, F, H, W]``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``k s / (1 + (k - 1) s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-clip ``[B]`` or per-frame ``[B, F]`` values over ``x`` ``[B, C, F, H, W]``."""
    if t.dim() == 1:
        return t.reshape(-1, 1, 1, 1, 1)
    if t.dim() == 2:
        return t[:, None, :, None, None]
    raise ValueError(f"timesteps must be [B] or [B, F], got shape {tuple(t.shape)}")


class FlowSchedule:
    """Shifted flow-matching schedule over ``num_train_timesteps`` discrete training levels.

    ``table`` holds the training sigmas: ``s = linspace(1, 0, T + 1)[:-1]`` shifted, so ``table[0] = 1`` (pure
    noise) and index ``i`` corresponds to the unshifted level ``1 - i / T``.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        base = torch.linspace(1.0, 0.0, self.num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.table = shift_sigmas(base, self.shift)

    # ------------------------------------------------------------------------------------------ schedules
    @property
    def timesteps(self) -> torch.Tensor:
        """Training timesteps ``1000 * table`` (float64, decreasing)."""
        return self.table * self.num_train_timesteps

    def warp(self, steps: Sequence[float]) -> torch.Tensor:
        """Few-step lists through the shifted table: nominal ``t`` (e.g. ``[1000, 750, 500, 250]``) -> the shifted
        timestep at table index ``T - t`` (about ``[1000, 937.5, 833.3, 625]`` at shift 5). float32 ``[n]``."""
        steps_t = torch.as_tensor(list(steps), dtype=torch.float64)
        if ((steps_t <= 0) | (steps_t > self.num_train_timesteps)).any():
            raise ValueError(f"denoising steps must lie in (0, {self.num_train_timesteps}], got {list(steps)}")
        index = (self.num_train_timesteps - steps_t).round().long()
        return self.timesteps[index].float()

    def inference_sigmas(self, num_steps: int) -> torch.Tensor:
        """The sigmas of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=k).set_timesteps(num_steps)``: a linear
        ramp from 1 to the shifted smallest training sigma, shifted, with a final 0 appended. ``[num_steps + 1]``."""
        sigma_min = shift_sigmas(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64), self.shift)
        ramp = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)
        return torch.cat([shift_sigmas(ramp, self.shift), ramp.new_zeros(1)]).float()

    # ------------------------------------------------------------------------------------- conversions
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma) x0 + sigma noise`` (computed in float32 at least)."""
        s = expand_like(self.sigma(t).to(torch.promote_types(x0.dtype, torch.float32)), x0)
        return ((1 - s) * x0 + s * noise).to(x0.dtype)

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching regression target ``noise - x0``."""
        return noise - x0

    def x0_from_velocity(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - sigma v``, in float64 to avoid cancellation, returned in ``xt``'s dtype."""
        s = expand_like(self.sigma(t).double(), xt)
        return (xt.double() - s * v.double()).to(xt.dtype)

    def velocity_from_x0(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = (x_t - x0) / sigma`` (undefined at ``sigma = 0``)."""
        s = expand_like(self.sigma(t).double(), xt)
        return ((xt.double() - x0.double()) / s).to(xt.dtype)

    # ---------------------------------------------------------------------------------------- training
    def sample_timesteps(
        self, shape: Sequence[int], generator: torch.Generator | None = None, distribution: str = "uniform",
        logit_mean: float = 0.0, logit_std: float = 1.0, device=None,
    ) -> torch.Tensor:
        """Random training timesteps of ``shape`` (float32).

        ``uniform``: a uniform index into the shifted table (Self-Forcing, CausVid). ``logit_normal``: an unshifted
        sigma ``sigmoid(N(mean, std))`` then shifted (SD3-style).
        """
        if distribution == "uniform":
            index = torch.randint(0, self.num_train_timesteps, tuple(shape), generator=generator)
            t = self.timesteps[index]
        elif distribution == "logit_normal":
            normal = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * logit_std + logit_mean
            t = shift_sigmas(torch.sigmoid(normal), self.shift) * self.num_train_timesteps
        else:
            raise ValueError(f"unknown timestep distribution {distribution!r} (uniform, logit_normal)")
        return t.float().to(device) if device is not None else t.float()

    def training_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Bell-curve loss weight ``exp(-2 ((t - T/2) / T)^2)``, normalised to mean 1 over the training table."""
        T = self.num_train_timesteps

        def bell(x):
            return torch.exp(-2 * ((x - T / 2) / T) ** 2)

        return (bell(t.double()) / bell(self.timesteps).mean()).to(t.dtype)

