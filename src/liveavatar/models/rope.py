"""3-axis rotary position embedding (RoPE) of Wan2.1, computed from positions on the fly.

The head dimension ``d`` is split into a time part of ``d - 4 * (d // 6)`` channels and height and width
parts of ``2 * (d // 6)`` channels each; every part rotates adjacent channel pairs ``(2i, 2i + 1)`` by
``position * theta ** (-2i / part_dim)``. Wan2.1 precomputes a 1024-row table per axis, which caps a video at
1024 latent frames; here angles are computed from the (possibly very large, possibly fractional) positions
themselves, so there is no ceiling and an engine may re-rotate cached keys at any position.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dimension given to the (time, height, width) axes."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def inverse_frequencies(part_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``theta ** (-2i / part_dim)`` for ``i < part_dim // 2``, float64 ``[part_dim // 2]``."""
    exponents = torch.arange(0, part_dim, 2, dtype=torch.float64) / part_dim
    return theta ** (-exponents)


def grid_angles(
    frame_pos: torch.Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0
) -> torch.Tensor:
    """Rotation angles for every token of a ``frames x height x width`` token grid.

    Args:
        frame_pos: ``[F]`` time position of each frame (int or float; any magnitude).
        height, width: token grid size (latent size divided by the patch size).
    Returns:
        float64 ``[F * height * width, head_dim // 2]`` angles in token order (frame-major, then row, column).
    """
    dt, dh, dw = axis_dims(head_dim)
    device = frame_pos.device
    ft = frame_pos.to(torch.float64)[:, None] * inverse_frequencies(dt, theta).to(device)
    fh = torch.arange(height, dtype=torch.float64, device=device)[:, None] * inverse_frequencies(dh, theta).to(device)
    fw = torch.arange(width, dtype=torch.float64, device=device)[:, None] * inverse_frequencies(dw, theta).to(device)
    n_frames = frame_pos.shape[0]
    angles = torch.cat(
        [
            ft[:, None, None, :].expand(n_frames, height, width, -1),
            fh[None, :, None, :].expand(n_frames, height, width, -1),
            fw[None, None, :, :].expand(n_frames, height, width, -1),
        ],
        dim=-1,
    )
    return angles.reshape(n_frames * height * width, head_dim // 2)


class RotaryTable:
    """cos/sin of :func:`grid_angles`, ready to rotate ``[B, L, H, D]`` queries or keys."""

    def __init__(self, angles: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.cos = angles.cos().to(dtype)
        self.sin = angles.sin().to(dtype)

    @classmethod
    def for_grid(cls, frame_pos: torch.Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0):
        return cls(grid_angles(frame_pos, height, width, head_dim, theta))

    @classmethod
    def stack(cls, tables: list["RotaryTable"]) -> "RotaryTable":
        """One table per batch element: cos/sin ``[B, L, D/2]`` (for lanes at different positions)."""
        out = cls.__new__(cls)
        out.cos = torch.stack([t.cos for t in tables])
        out.sin = torch.stack([t.sin for t in tables])
        return out

    @classmethod
    def cat(cls, tables: list["RotaryTable"]) -> "RotaryTable":
        """The tables' tokens one after another (all ``[L_i, D/2]``, or all ``[B, L_i, D/2]``)."""
        out = cls.__new__(cls)
        out.cos = torch.cat([t.cos for t in tables], dim=-2)
        out.sin = torch.cat([t.sin for t in tables], dim=-2)
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent channel pairs of ``x`` ``[B, L, H, D]`` (computed in float32, returned in x's dtype).
        The table is ``[L, D/2]`` (shared by the batch) or ``[B, L, D/2]`` (one per batch element)."""
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        cos = self.cos[..., None, :] if self.cos.dim() == 3 else self.cos[None, :, None, :]
        sin = self.sin[..., None, :] if self.sin.dim() == 3 else self.sin[None, :, None, :]
        out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return out.flatten(-2).type_as(x)


class RopeTables:
    """RoPE tables of one token grid on one device, built on that device and cached by frame positions.

    A streaming forward needs the table of a handful of frame positions (sink, history slots, current block);
    under Rolling RoPE and RAPR only a few distinct position lists ever occur, so after the first blocks every
    table is a cache hit and a forward does no table work. Positions are Python ints (host bookkeeping): a miss
    computes the angles on the device from them without copying anything from the host. Both caches are LRU
    with a fixed capacity, so memory stays bounded under ever-growing ``absolute`` positions.
    Equal, bit for bit, to :meth:`RotaryTable.for_grid` of the same positions.
    """

    def __init__(self, height: int, width: int, head_dim: int, theta: float = 10000.0, device=None,
                 capacity: int = 128):
        dt, dh, dw = axis_dims(head_dim)
        self.tokens = height * width
        self.capacity = capacity
        self.inv_time = inverse_frequencies(dt, theta).to(device)
        fh = torch.arange(height, dtype=torch.float64, device=device)[:, None] * inverse_frequencies(dh, theta).to(device)
        fw = torch.arange(width, dtype=torch.float64, device=device)[:, None] * inverse_frequencies(dw, theta).to(device)
        self.spatial = torch.cat([fh[:, None, :].expand(height, width, -1), fw[None, :, :].expand(height, width, -1)],
                                 dim=-1).reshape(self.tokens, -1)  # [T, (dh + dw) / 2]
        self._frames: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._tables: OrderedDict[tuple, RotaryTable] = OrderedDict()

    @staticmethod
    def _lru(cache: OrderedDict, key, build, capacity: int):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = build()
        if len(cache) > capacity:
            cache.popitem(last=False)
        return value

    def _frame(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, D/2]`` of one frame at time position ``pos``."""
        def build():
            time = (self.inv_time * float(pos))[None].expand(self.tokens, -1)
            angles = torch.cat([time, self.spatial], dim=-1)
            return angles.cos().float(), angles.sin().float()

        return self._lru(self._frames, pos, build, self.capacity * 4)

    def table(self, positions: tuple[int, ...]) -> RotaryTable:
        """Table ``[len(positions) * T, D/2]`` of consecutive frames at ``positions``."""
        def build():
            frames = [self._frame(p) for p in positions]
            out = RotaryTable.__new__(RotaryTable)
            out.cos = torch.cat([c for c, _ in frames])
            out.sin = torch.cat([s for _, s in frames])
            return out

        return self._lru(self._tables, tuple(positions), build, self.capacity)

    def time_shift(self, angles: torch.Tensor, shift: int) -> torch.Tensor:
        """Angles ``[M, D/2]`` of tokens moved ``shift`` frames later in time (their rows and columns unchanged)."""
        time = self.inv_time * float(shift)
        return angles + torch.cat([time, time.new_zeros(angles.shape[-1] - time.shape[0])])

    def stacked(self, positions: tuple[tuple[int, ...], ...]) -> RotaryTable:
        """One table per batch element ``[n, L, D/2]`` (every element lists as many frames), or one shared
        ``[L, D/2]`` table when all elements have the same positions."""
        if all(p == positions[0] for p in positions):
            return self.table(positions[0])  # broadcast over the batch
        return self._lru(self._tables, positions, lambda: RotaryTable.stack([self.table(p) for p in positions]),
                         self.capacity)
