"""Preallocated per-layer KV cache for block-causal streaming.

Layout per layer: ``[lanes, slots, T, H, D]`` keys (stored *un-rotated*, so any position policy can rotate
them at attention time) and values, with ``slots = sink_frames + window_frames``. The first ``sink_frames``
slots hold the sink (never evicted); the rest are a ring over latent frames (frame ``f`` lives in slot
``sink_frames + f % window_frames``). A *lane* is an independent stream of history: one per denoising step in
the timestep-forced mode (each step keeps the history at its own noise level), or a single lane for the clean
mode. Memory is fixed at construction: it does not grow with the length of the video.

Beside the slots, a sink may hold ``fixed_tokens`` tokens that are not whole frames (Live Avatar's release puts
the FramePack motion tokens of the reference into its sink): ``fixed_k``/``fixed_v`` ``[lanes, M, H, D]`` per
layer, written with the sink, never evicted, un-rotated like the rest.

Keys and values live on the model's device. The bookkeeping (which slot holds which frame, which slots are
filled) is plain host data: reading it never waits for the device. Engines address lanes as a contiguous
range (``lo:hi``), so every read is a view and every write a slice copy: no index tensors, no gathers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    def __init__(
        self, layers: int, lanes: int, sink_frames: int, window_frames: int, tokens_per_frame: int,
        heads: int, head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        fixed_tokens: int = 0,
    ):
        if window_frames < 0 or sink_frames < 0:
            raise ValueError("cache sizes must not be negative")
        self.sink_frames, self.window_frames, self.tokens_per_frame = sink_frames, window_frames, tokens_per_frame
        self.lanes = lanes
        self.slots = sink_frames + window_frames
        shape = (layers, lanes, self.slots, tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.fixed_tokens = fixed_tokens
        fixed = (layers, lanes, fixed_tokens, heads, head_dim)
        self.fixed_k = torch.zeros(fixed, dtype=dtype, device=device)
        self.fixed_v = torch.zeros(fixed, dtype=dtype, device=device)
        # Host bookkeeping per lane and slot: the training position of a sink frame, the stream frame index of
        # a history frame (None: empty).
        self.frame: list[list[int | None]] = [[None] * self.slots for _ in range(lanes)]

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.fixed_k.numel()) * self.k.element_size() * 2

    def history_slot(self, frame: int) -> int:
        """Ring slot of stream frame ``frame``."""
        if self.window_frames == 0:
            raise ValueError("the cache has no history window (window_frames = 0)")
        return self.sink_frames + frame % self.window_frames

    def view(self, layer: int, lanes: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated keys and values of ``lanes``: ``[n, slots * T, H, D]`` each (views, no copy)."""
        return self.k[layer, lanes].flatten(1, 2), self.v[layer, lanes].flatten(1, 2)

    def fixed_view(self, layer: int, lanes: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated keys and values of the sink's fixed tokens: ``[n, M, H, D]`` each (views)."""
        return self.fixed_k[layer, lanes], self.fixed_v[layer, lanes]

    def valid(self, lane: int) -> tuple[bool, ...]:
        return tuple(f is not None for f in self.frame[lane])

    def write_history(self, layer: int, lanes: slice, starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ``[n, F * T, H, D]`` of the blocks starting at stream frames ``starts`` (one per lane of
        ``lanes``). A block's frames occupy consecutive ring slots because the window is a whole number of
        blocks."""
        n = k.shape[0]
        frames = k.shape[1] // self.tokens_per_frame
        k = k.unflatten(1, (frames, self.tokens_per_frame))
        v = v.unflatten(1, (frames, self.tokens_per_frame))
        for i, start in enumerate(starts[:n]):
            lane, slot = lanes.start + i, self.history_slot(start)
            self.k[layer, lane, slot : slot + frames] = k[i]
            self.v[layer, lane, slot : slot + frames] = v[i]

    def commit_history(self, lanes: slice, starts: list[int], frames: int) -> None:
        """Mark the blocks as present (after all layers were written, so that a forward never sees the slots it
        is writing as its own history)."""
        for i, start in enumerate(starts):
            slot = self.history_slot(start)
            self.frame[lanes.start + i][slot : slot + frames] = list(range(start, start + frames))

    def write_sink(self, layer: int, lanes: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store sink keys/values ``[R * T + M, H, D]`` (one sink, shared by all ``lanes``): the frames in the first
        ``R`` slots, the last ``M = fixed_tokens`` tokens in the fixed region."""
        m = self.fixed_tokens
        if m:
            self.fixed_k[layer, lanes] = k[-m:]
            self.fixed_v[layer, lanes] = v[-m:]
            k, v = k[:-m], v[:-m]
        r = k.shape[0] // self.tokens_per_frame
        if r > self.sink_frames:
            raise ValueError(f"a sink of {r} frames does not fit the cache's {self.sink_frames} sink slots")
        self.k[layer, lanes, :r] = k.unflatten(0, (r, self.tokens_per_frame))
        self.v[layer, lanes, :r] = v.unflatten(0, (r, self.tokens_per_frame))

    def commit_sink(self, lanes: slice, positions: tuple[int, ...]) -> None:
        """Mark the first ``len(positions)`` slots of ``lanes`` as the sink with these training positions; the rest
        of the sink slots become empty."""
        for lane in range(lanes.start, lanes.stop):
            self.frame[lane][: self.sink_frames] = list(positions) + [None] * (self.sink_frames - len(positions))

    def block_entry(self, lane: int, start: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values ``[layers, frames, T, H, D]`` of the block that starts at stream frame
        ``start`` in ``lane`` (what a block adds to the history)."""
        slot = self.history_slot(start)
        return self.k[:, lane, slot : slot + frames].clone(), self.v[:, lane, slot : slot + frames].clone()

    def sink_entry(self, lane: int) -> SinkEntry:
        """A copy of ``lane``'s sink slots and their positions."""
        return SinkEntry(self.k[:, lane, : self.sink_frames].clone(), self.v[:, lane, : self.sink_frames].clone(),
                         list(self.frame[lane][: self.sink_frames]),
                         self.fixed_k[:, lane].clone(), self.fixed_v[:, lane].clone())

    def rebuild(self, lane: int, sink: SinkEntry | None, blocks: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Make ``lane`` hold exactly ``sink`` and the history blocks ``(start, k, v)`` (as written by
        :meth:`block_entry`): the cache a block saw, rebuilt from what each block added to it."""
        self.frame[lane] = [None] * self.slots
        if sink is not None:
            self.k[:, lane, : self.sink_frames] = sink.k
            self.v[:, lane, : self.sink_frames] = sink.v
            self.frame[lane][: self.sink_frames] = list(sink.frame)
            self.fixed_k[:, lane], self.fixed_v[:, lane] = sink.fixed_k, sink.fixed_v
        for start, k, v in blocks:
            slot, frames = self.history_slot(start), k.shape[1]
            self.k[:, lane, slot : slot + frames] = k
            self.v[:, lane, slot : slot + frames] = v
            self.frame[lane][slot : slot + frames] = list(range(start, start + frames))


@dataclass
class SinkEntry:
    k: torch.Tensor
    v: torch.Tensor
    frame: list[int | None]
    fixed_k: torch.Tensor
    fixed_v: torch.Tensor
