"""Preallocated per-layer KV cache for block-causal streaming.

Layout per layer: ``[lanes, slots, T, H, D]`` keys (stored *un-rotated*, so any position policy can rotate
them at attention time) and values, with ``slots = sink_frames + window_frames``. The first ``sink_frames``
slots hold the sink (never evicted); the rest are a ring over latent frames (frame ``f`` lives in slot
``sink_frames + f % window_frames``). A *lane* is an independent stream of history: one per denoising step in
the timestep-forced mode (each step keeps the history at its own noise level), or a single lane for the clean
mode. Memory is fixed at construction: it does not grow with the length of the video.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, layers: int, lanes: int, sink_frames: int, window_frames: int, tokens_per_frame: int,
        heads: int, head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ):
        if window_frames < 0 or sink_frames < 0:
            raise ValueError("cache sizes must not be negative")
        self.sink_frames, self.window_frames, self.tokens_per_frame = sink_frames, window_frames, tokens_per_frame
        slots = sink_frames + window_frames
        shape = (layers, lanes, slots, tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Time position of each slot: a fixed RoPE position for sink slots, the absolute latent frame index for
        # history slots; ``valid`` marks filled slots.
        self.frame = torch.zeros(lanes, slots, dtype=torch.long)
        self.valid = torch.zeros(lanes, slots, dtype=torch.bool)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def history_slots(self, frames: torch.Tensor) -> torch.Tensor:
        """Ring slots of absolute latent frames ``frames`` (any shape)."""
        if self.window_frames == 0:
            raise ValueError("the cache has no history window (window_frames = 0)")
        return self.sink_frames + frames % self.window_frames

    def keys(self, layer: int, lanes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated keys and values of ``lanes`` ``[n]``: ``[n, slots * T, H, D]`` each."""
        k, v = self.k[layer, lanes], self.v[layer, lanes]
        return k.flatten(1, 2), v.flatten(1, 2)

    def key_mask(self, lanes: torch.Tensor) -> torch.Tensor:
        """``[n, slots * T]`` True for filled slots."""
        return self.valid[lanes].repeat_interleave(self.tokens_per_frame, dim=1).to(self.k.device)

    def write_history(self, layer: int, lanes: torch.Tensor, frames: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v`` ``[n, F * T, H, D]`` of frames ``[n, F]`` (absolute indices) into the ring of ``lanes``."""
        n, f = frames.shape
        slots = self.history_slots(frames).to(self.k.device)
        lane_idx = lanes.to(self.k.device)[:, None].expand(n, f)
        shape = (n, f, self.tokens_per_frame, *k.shape[2:])
        self.k[layer, lane_idx, slots] = k.reshape(shape).to(self.k.dtype)
        self.v[layer, lane_idx, slots] = v.reshape(shape).to(self.v.dtype)

    def commit_history(self, lanes: torch.Tensor, frames: torch.Tensor) -> None:
        """Mark frames ``[n, F]`` as present (after all layers were written, so that a forward never sees the
        slots it is writing as its own history)."""
        slots = self.history_slots(frames)
        lane_idx = lanes[:, None].expand_as(frames)
        self.frame[lane_idx, slots] = frames
        self.valid[lane_idx, slots] = True

    def write_sink(self, layer: int, lanes: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store sink keys/values ``[R * T, H, D]`` (one sink, shared by all ``lanes``) in the first ``R`` slots."""
        r = k.shape[0] // self.tokens_per_frame
        if r > self.sink_frames:
            raise ValueError(f"a sink of {r} frames does not fit the cache's {self.sink_frames} sink slots")
        shape = (r, self.tokens_per_frame, *k.shape[1:])
        lane_idx = lanes.to(self.k.device)
        self.k[layer, lane_idx, :r] = k.reshape(shape).to(self.k.dtype)
        self.v[layer, lane_idx, :r] = v.reshape(shape).to(self.v.dtype)

    def commit_sink(self, lanes: torch.Tensor, positions: torch.Tensor) -> None:
        """Mark the first ``len(positions)`` slots of ``lanes`` as the sink at RoPE ``positions``; the rest of the
        sink slots become empty."""
        r = positions.numel()
        self.frame[lanes, :r] = positions.long()
        self.valid[lanes, : self.sink_frames] = False
        self.valid[lanes, :r] = True
