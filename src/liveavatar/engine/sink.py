"""What the never-evicted sink holds, and when it changes (``engine.sink``).

- ``none``: no sink.
- ``reference`` (Live Avatar's RSFM, StreamAvatar's Reference Sink): the reference image latent, at the model's
  ``reference_position``. With ``keep_first_block`` the first generated block joins it once it is done
  (StreamAvatar), its frames keeping their offsets to the reference.
- ``aas`` (Adaptive Attention Sink): the reference at first; once the first block is generated, its first
  latent frame replaces the reference (in latent space, at the reference's position) and stays the sole
  identity anchor, so that the sink is the model's own, in-distribution output.
- ``evicted``: the ablation "without a sink" for a model that takes its reference as sink tokens. The reference
  conditions the stream's start as the frame before it and leaves with the history window (from block
  ``window_blocks`` on, when a history frame at its position would have been evicted); after that the identity
  lives only in the generated frames, as in a causal model whose first frame slides out of its window.

Where the sink sits relative to the current block is the position policy's business
(:mod:`liveavatar.engine.positions`); here a sink frame only carries its *training* position.

The sink of block ``b`` depends only on ``b``: version 0 (initial) for ``b < switch_block``, version 1 after.
Pipelines need that: with one stage per denoising step, block ``b``'s first step runs before block 0 is done
whenever ``b`` is below the number of steps, so ``switch_block`` defaults to the number of steps and every
engine switches at the same block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SINKS = ("none", "reference", "aas", "evicted")


@dataclass
class SinkState:
    """A sink version: latents ``[1, C, R, H, W]`` and their training positions (``R`` ints)."""

    version: int
    latents: torch.Tensor | None
    positions: tuple[int, ...]


class SinkSchedule:
    def __init__(self, mode: str, reference: torch.Tensor | None, frames_per_block: int,
                 switch_block: int, keep_first_block: bool = False, reference_position: int = -1):
        if mode not in SINKS:
            raise ValueError(f"engine.sink must be one of {SINKS}, got {mode!r}")
        if mode != "none" and reference is None:
            raise ValueError(f"engine.sink={mode} needs a reference image")
        if switch_block < 1:
            raise ValueError(f"the sink can switch at block 1 at the earliest, got {switch_block}")
        if keep_first_block and mode != "reference":
            raise ValueError(f"engine.keep_first_block=true adds the first block to a reference sink "
                             f"(engine.sink=reference); engine.sink={mode} has no reference to keep it beside")
        self.mode, self.frames_per_block, self.switch_block = mode, frames_per_block, switch_block
        self.keep_first_block = keep_first_block
        self.reference_position = reference_position
        self.reference = reference[:, :, :1] if reference is not None else None
        self._switched: SinkState | None = None

    @property
    def changes(self) -> bool:
        """The sink switches to version 1 at ``switch_block``."""
        return self.mode in ("aas", "evicted") or self.keep_first_block

    @property
    def needs_first_block(self) -> bool:
        """Version 1 is made of block 0's clean latents (engines must hand them over before ``switch_block``)."""
        return self.mode == "aas" or self.keep_first_block

    @property
    def capacity(self) -> int:
        """Sink slots the cache needs."""
        if self.mode == "none":
            return 0
        return 1 + (self.frames_per_block if self.keep_first_block else 0)

    def trained_positions(self, version: int) -> tuple[int, ...]:
        """Training positions of the frames of sink ``version`` (known before the latents are)."""
        if self.mode == "none" or (version == 1 and self.mode == "evicted"):
            return ()
        if version == 1 and self.keep_first_block:
            return (self.reference_position, *range(self.frames_per_block))
        return (self.reference_position,)

    def initial(self) -> SinkState:
        if self.mode == "none":
            return SinkState(0, None, ())
        return SinkState(0, self.reference, self.trained_positions(0))

    def first_block_done(self, x0: torch.Tensor) -> None:
        """Record block 0's clean latents ``[1, C, F, H, W]`` (the material of the switched sink)."""
        if self.mode == "aas":
            self._switched = SinkState(1, x0[:, :, :1], self.trained_positions(1))
        elif self.keep_first_block:
            self._switched = SinkState(1, torch.cat([self.reference, x0.to(self.reference.dtype)], dim=2),
                                       self.trained_positions(1))

    def for_block(self, b: int) -> SinkState:
        """The sink block ``b`` attends to."""
        if not self.changes or b < self.switch_block:
            return self.initial()
        if self.mode == "evicted":
            return SinkState(1, None, ())
        if self._switched is None:
            raise RuntimeError(f"block {b} needs the switched sink but block 0 has not finished")
        return self._switched
