"""What the never-evicted sink holds, and when it changes (``engine.sink``).

- ``none``: no sink.
- ``reference`` (Live Avatar's RSFM, StreamAvatar's Reference Sink): the reference image latent, at position
  ``-1``. With ``keep_first_block`` the first generated block joins it once it is done (StreamAvatar).
- ``aas`` (Adaptive Attention Sink): the reference at first; once the first block is generated, its first frame
  replaces the reference, so that the sink is the model's own, in-distribution output.

The sink of block ``b`` depends only on ``b``: version 0 (initial) for ``b < switch_block``, version 1 after.
Pipelines need that: with one stage per denoising step, block ``b``'s first step runs before block 0 is done
whenever ``b`` is below the number of steps, so ``switch_block`` defaults to the number of steps and every
engine switches at the same block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SINKS = ("none", "reference", "aas")


@dataclass
class SinkState:
    """A sink version: latents ``[1, C, R, H, W]`` and their RoPE positions ``[R]``."""

    version: int
    latents: torch.Tensor | None
    positions: torch.Tensor | None


class SinkSchedule:
    def __init__(self, mode: str, reference: torch.Tensor | None, frames_per_block: int,
                 switch_block: int, keep_first_block: bool = False):
        if mode not in SINKS:
            raise ValueError(f"engine.sink must be one of {SINKS}, got {mode!r}")
        if mode != "none" and reference is None:
            raise ValueError(f"engine.sink={mode} needs a reference image")
        if switch_block < 1:
            raise ValueError(f"the sink can switch at block 1 at the earliest, got {switch_block}")
        self.mode, self.frames_per_block, self.switch_block = mode, frames_per_block, switch_block
        self.keep_first_block = keep_first_block and mode == "reference"
        self.reference = reference[:, :, :1] if reference is not None else None
        self._switched: SinkState | None = None

    @property
    def changes(self) -> bool:
        return self.mode == "aas" or self.keep_first_block

    @property
    def capacity(self) -> int:
        """Sink slots the cache needs."""
        if self.mode == "none":
            return 0
        return 1 + (self.frames_per_block if self.keep_first_block else 0)

    def initial(self) -> SinkState:
        if self.mode == "none":
            return SinkState(0, None, None)
        return SinkState(0, self.reference, torch.tensor([-1]))

    def first_block_done(self, x0: torch.Tensor) -> None:
        """Record block 0's clean latents ``[1, C, F, H, W]`` (the material of the switched sink)."""
        if self.mode == "aas":
            self._switched = SinkState(1, x0[:, :, :1], torch.tensor([-1]))
        elif self.keep_first_block:
            f = x0.shape[2]
            self._switched = SinkState(1, torch.cat([self.reference, x0], dim=2), torch.arange(-1, f))

    def for_block(self, b: int) -> SinkState:
        """The sink block ``b`` attends to."""
        if not self.changes or b < self.switch_block:
            return self.initial()
        if self._switched is None:
            raise RuntimeError(f"block {b} needs the switched sink but block 0 has not finished")
        return self._switched
