"""RoPE time positions of the sink, the history and the current block (``model.rope.*``), the same in training
and in streaming.

Frames are numbered by their stream index ``f``; the current block starts at frame ``n``. RoPE only sees
differences of positions, and history frames always keep their true offsets ``f - n`` to the current block, so a
policy is defined by one number: the **sink offset** ``d(n)``, the sink's position minus the current block's
first position. ``reference_position`` (``ref``, a property of the model) is where Stage 0/1 training put the
reference relative to a clip's first frame: ``-1`` (just before it) for this project's models and Wan2.1,
ahead of the clip for Wan-S2V.

- ``absolute`` (the baseline): ``d(n) = ref - n``; the sink drifts ever farther away over a long stream.
- ``rolling`` (Live Avatar's Rolling RoPE, full paper, supplementary F): ``d(n) = max(ref - n, k)`` with the
  rolling offset ``k`` (default: one block, the sink sits just AHEAD of the current block). The sink's index is
  re-assigned every block, its un-rotated cached keys re-rotated, so the sink-to-current distance is ``k``
  forever (until then, for a reference trained ahead of the clip, the training position itself).
- ``rapr`` (StreamAvatar's Reference-Anchored Positional Re-encoding): ``d(n) = -min(n - ref, D)``: the
  current block's distance to the reference is capped at ``D`` (``max_distance``); every cached key keeps its
  offset to the current block. Needs a reference behind the clip.

Multi-frame sinks (the reference plus the first block) keep their internal offsets: sink frame ``j`` trained at
``p_j`` sits at ``n + d(n) + (p_j - ref)``. A configuration whose sink would land on a frame the current block
sees (its own frames or the ``window_frames`` of history) is refused.

Streaming keeps the numbers bounded: the current block sits at ``anchor(n) = min(n, window_frames)`` under
``rolling`` and ``rapr`` (``n`` under ``absolute``), so positions never grow with the length of the stream.
Training (:meth:`PositionPolicy.training_positions`) treats each clip as a window of a longer stream that starts
at a random frame ``r`` in ``[0, train_shift]``, so a short clip shows the model the offsets a long stream
produces. With Stage 1's motion frames, that window holds the motion frames and then the clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("absolute", "rolling", "rapr")


@dataclass
class PositionPolicy:
    policy: str = "rolling"
    frames_per_block: int = 3
    window_frames: int = 9            # history frames a block attends to (window_blocks * frames_per_block)
    reference_position: int = -1      # the reference's training position relative to a clip's first frame
    rolling_offset: int | None = None  # k of rolling (None: frames_per_block, just past the current block)
    max_distance: int = 10            # D of rapr
    train_shift: int = 0              # training: clips start at a random stream frame in [0, train_shift]

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"model.rope.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.rolling_offset is None:
            self.rolling_offset = self.frames_per_block
        if self.train_shift < 0:
            raise ValueError(f"model.rope.train_shift must not be negative, got {self.train_shift}")
        if self.policy == "rapr":
            if self.reference_position >= 0:
                raise ValueError(f"model.rope.policy=rapr caps the distance to a reference BEHIND the clip; this "
                                 f"model's reference_position is {self.reference_position}")
            if self.max_distance < 1:
                raise ValueError(f"model.rope.max_distance must be at least 1, got {self.max_distance}")

    @classmethod
    def from_config(cls, frames_per_block: int, reference_position: int, window_blocks: int,
                    rope: dict | None = None) -> "PositionPolicy":
        """From the model config's ``window_blocks`` and ``rope`` keys (``policy``, ``max_distance``,
        ``rolling_offset``, ``train_shift``): the one place training and streaming read them."""
        rope = dict(rope or {})
        if int(window_blocks) < 1:
            raise ValueError(f"model.window_blocks must be at least 1, got {window_blocks}")
        policy = cls(policy=rope.get("policy", "rolling"), frames_per_block=frames_per_block,
                     window_frames=int(window_blocks) * frames_per_block, reference_position=reference_position,
                     rolling_offset=rope.get("rolling_offset"), max_distance=int(rope.get("max_distance", 10)),
                     train_shift=int(rope.get("train_shift", 0)))
        policy.check([reference_position])
        return policy

    @property
    def window_blocks(self) -> int:
        return self.window_frames // self.frames_per_block

    # ---------------------------------------------------------------------------------------------- policy
    def sink_offset(self, n: int) -> int:
        """Position of the sink (its reference frame) minus that of the first frame of the block at ``n``."""
        ref = self.reference_position
        if self.policy == "absolute":
            return ref - n
        if self.policy == "rolling":
            return max(ref - n, self.rolling_offset)
        return -min(n - ref, self.max_distance)

    def anchor(self, n: int) -> int:
        """Streaming position of the first frame of the block that starts at stream frame ``n``."""
        return n if self.policy == "absolute" else min(n, self.window_frames)

    def frame_positions(self, frames: torch.Tensor, n: int) -> torch.Tensor:
        """Streaming positions of stream frames ``frames`` (any shape) seen from the block at ``n``."""
        return frames - n + self.anchor(n)

    def sink_positions(self, trained: torch.Tensor, n: int) -> torch.Tensor:
        """Streaming positions of sink frames whose training positions are ``trained`` (``[R]``), seen from the
        block at ``n``."""
        return trained - self.reference_position + self.anchor(n) + self.sink_offset(n)

    # -------------------------------------------------------------------------------------------- checks
    def check(self, sink_trained: list[int], from_frame: int = 0) -> None:
        """Raise if, for a block from stream frame ``from_frame`` on, a sink frame (training positions
        ``sink_trained``) would share a position with a frame that block attends to (its own ``frames_per_block``
        frames or up to ``window_frames`` of history). Offsets settle after a few windows, so a finite scan is
        exhaustive."""
        if not sink_trained:
            return
        f, w = self.frames_per_block, self.window_frames
        extent = max(abs(self.reference_position), self.max_distance, abs(self.rolling_offset), w) + w + 2 * f
        for n in range(from_frame, from_frame + extent + 1, f):
            seen = set(range(-min(n, w), f))
            sink = {self.sink_offset(n) + p - self.reference_position for p in sink_trained}
            clash = sorted(seen & sink)
            if clash:
                raise ValueError(
                    f"model.rope.policy={self.policy}: at stream frame {n} the sink would sit at offset {clash[0]} "
                    f"from the current block, on a frame it attends to (history window {w} frames, block {f}); "
                    + self._remedy())

    def _remedy(self) -> str:
        if self.policy == "rapr":
            return f"model.rope.max_distance ({self.max_distance}) must exceed the history window plus the sink"
        if self.policy == "rolling":
            return (f"model.rope.rolling_offset ({self.rolling_offset}) must be at least frames_per_block "
                    f"({self.frames_per_block}) or behind the whole window")
        return "the reference is trained inside the range of streamed positions"

    # ------------------------------------------------------------------------------------------ training
    def training_positions(self, batch: int, frames: int, generator: torch.Generator | None = None,
                           device=None, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions for a block-causal training forward over clips of ``frames`` latent frames, each preceded
        by ``context`` motion frames.

        Each window of motion frames and clip starts at a random stream frame ``r`` in ``[0, train_shift]``; clip
        frame ``i`` sits at ``c = r + context + i`` and block ``j``'s sink at ``c + j f + d(c + j f)`` (the motion
        frames at ``r .. r + context - 1``, as the model places them; :meth:`check_context` says whether a sink
        lands on one).

        Returns:
            frame positions ``[B, F]`` and the reference's position per block ``[B, F / f]`` (long).
        """
        f = self.frames_per_block
        if frames % f:
            raise ValueError(f"clips of {frames} latent frames do not split into blocks of {f}")
        start = torch.randint(0, self.train_shift + 1, (batch,), generator=generator) + context
        frame_pos = start[:, None] + torch.arange(frames)[None]
        sink = torch.tensor([self.block_sinks(s, frames) for s in start.tolist()])
        return frame_pos.to(device), sink.to(device)

    def block_sinks(self, first: int, frames: int) -> list[int]:
        """Training position of the reference for each block of a clip whose first frame is stream frame ``first``."""
        f = self.frames_per_block
        return [first + j * f + self.sink_offset(first + j * f) for j in range(frames // f)]

    def check_context(self, context: int, frames: int) -> None:
        """Raise if, for some training start, a block's sink would share a position with one of the ``context``
        motion frames before the clip: every block sees them all, whatever its window (RAPR's cap can land
        there)."""
        for r in range(self.train_shift + 1):
            clash = sorted(set(self.block_sinks(r + context, frames)) & set(range(r, r + context)))
            if clash:
                raise ValueError(
                    f"model.rope.policy={self.policy}: with {context} motion frames before a clip of {frames} frames, "
                    f"a block's sink sits at position {clash[0]}, on a motion frame every block attends to; "
                    + (self._remedy() if self.policy != "rapr" else
                       f"model.rope.max_distance ({self.max_distance}) must exceed "
                       f"{frames - self.frames_per_block + context}, the last block's distance to the first "
                       f"motion frame"))
