"""3-axis rotary position embedding (RoPE) of Wan2.1, computed from positions on the fly.

The head dimension ``d`` is split into a time part of ``d - 4 * (d // 6)`` channels and height and width
parts of ``2 * (d // 6)`` channels each; every part rotates adjacent channel pairs ``(2i, 2i + 1)`` by
``position * theta ** (-2i / part_dim)``. Wan2.1 precomputes a 1024-row table per axis, which caps a video at
1024 latent frames; here angles are computed from the (possibly very large, possibly fractional) positions
themselves, so there is no ceiling and an engine may re-rotate cached keys at any position.
"""
from __future__ import annotations

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

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent channel pairs of ``x`` ``[B, L, H, D]`` (computed in float32, returned in x's dtype).
        The table is ``[L, D/2]`` (shared by the batch) or ``[B, L, D/2]`` (one per batch element)."""
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        cos = self.cos[..., None, :] if self.cos.dim() == 3 else self.cos[None, :, None, :]
        sin = self.sin[..., None, :] if self.sin.dim() == 3 else self.sin[None, :, None, :]
        out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return out.flatten(-2).type_as(x)
