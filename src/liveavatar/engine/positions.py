"""RoPE time positions of the current block, its history and the sink (``model.rope.policy``).

Frames are indexed by their absolute latent frame number ``f``; the current block starts at frame ``n``. The
sink sits at fixed positions (the reference at ``-1``, just before the first frame, as in training).

- ``absolute``: position ``f``. The baseline; positions grow without bound over a long video.
- ``rolling`` (Live Avatar's Rolling RoPE): keys are cached un-rotated and re-rotated each step so that the
  current block sits at ``min(n, window)`` and history keeps its offsets to it; once the window is full the
  sink keeps one fixed relative distance to the current block, forever.
- ``rapr`` (StreamAvatar's Reference-Anchored Positional Re-encoding): the same re-encoding with the distance
  from the reference capped at ``D`` (``max_distance``): the current block sits at ``min(n, D - 1)``.
For the first frames (``n`` below the cap) every policy gives the absolute positions, which is what a model
trained on short clips has seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("absolute", "rolling", "rapr")


@dataclass
class PositionPolicy:
    policy: str = "rolling"
    window_frames: int = 9
    max_distance: int = 10

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"model.rope.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "rapr" and self.max_distance < 1:
            raise ValueError("model.rope.max_distance must be at least 1")

    def anchor(self, n: int) -> int:
        """Position given to the first frame of the block that starts at latent frame ``n``."""
        if self.policy == "absolute":
            return n
        cap = self.window_frames if self.policy == "rolling" else self.max_distance - 1
        return min(n, cap)

    def positions(self, frames: torch.Tensor, n: int) -> torch.Tensor:
        """Positions of frames ``frames`` (absolute indices, any shape) seen from the block starting at ``n``."""
        return frames - n + self.anchor(n)
