"""Who attends to whom, and at which RoPE positions, in a full-sequence forward of ``[sink frames | clip frames]``.

The full-sequence forward is what training runs and what the streaming engine is checked against, so it
expresses every streaming policy: a block-causal mask with a history window (a block sees the sink, itself and
at most ``window_blocks`` earlier blocks), and a sink whose position may differ per query block (Rolling RoPE,
RAPR). The sink's own computation does not depend on where it sits (it attends only to itself, so only its
internal offsets matter); only the rotation of its keys does. A per-block sink is therefore one set of sink
tokens whose keys and values appear once per block, each copy rotated at that block's sink position and
visible to that block alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .attention import attend
from .rope import RotaryTable, grid_angles


@dataclass
class SequenceAttention:
    """Self-attention over a full sequence: queries rotated by ``rope_q``; keys (``key_index`` picks them from the
    sequence, repeating the sink's per block) rotated by ``rope_k``; boolean ``mask`` ``[L, S]`` (True: may
    attend) or None."""

    rope_q: RotaryTable
    rope_k: RotaryTable
    key_index: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.key_index is not None:
            k, v = k.index_select(1, self.key_index), v.index_select(1, self.key_index)
        return attend(self.rope_q.rotate(q), self.rope_k.rotate(k), v, self.mask)


def _table(positions: torch.Tensor, h: int, w: int, head_dim: int, theta: float) -> RotaryTable:
    """RoPE table of frame positions ``[N]`` (shared) or ``[B, N]`` (one per clip)."""
    if positions.dim() == 1:
        return RotaryTable.for_grid(positions, h, w, head_dim, theta)
    return RotaryTable.stack([RotaryTable.for_grid(p, h, w, head_dim, theta) for p in positions])


def sequence_attention(frame_pos: torch.Tensor, sink_pos: torch.Tensor | None, grid: tuple[int, int],
                       head_dim: int, theta: float, causal: bool, frames_per_block: int,
                       window_blocks: int | None = None) -> SequenceAttention:
    """Build the attention of a forward over ``R`` sink frames followed by ``F`` clip frames.

    Args:
        frame_pos: ``[F]`` or ``[B, F]`` time positions of the clip frames.
        sink_pos: None (no sink), ``[R]`` / ``[B, R]`` (one sink for every frame), or ``[B, F / frames_per_block, R]``
            (block ``j`` sees the sink at ``sink_pos[:, j]``; causal only).
        grid: token rows and columns of a frame.
        causal: block-causal between blocks of ``frames_per_block`` frames (bidirectional inside a block); else
            every clip frame sees every clip frame.
        window_blocks: causal only: a block sees at most this many earlier blocks (None: all of them).
    Sink frames see only the sink; every clip frame sees the sink.
    """
    h, w = grid
    device = frame_pos.device
    frames = frame_pos.shape[-1]
    per_block = sink_pos is not None and sink_pos.dim() == 3
    if per_block and not causal:
        raise ValueError("a sink position per block needs the block-causal mask")
    if sink_pos is not None and frame_pos.dim() == 2 and sink_pos.dim() == 1:
        sink_pos = sink_pos.expand(frame_pos.shape[0], -1)
    if sink_pos is not None and frame_pos.dim() == 1 and sink_pos.dim() >= 2:
        frame_pos = frame_pos.expand(sink_pos.shape[0], -1)
    r = 0 if sink_pos is None else sink_pos.shape[-1]
    blocks = frames // frames_per_block if causal else 1
    mask = _mask(frames, frames_per_block, r, per_block, causal, window_blocks, h * w, str(device))

    if r == 0:
        rope = _table(frame_pos, h, w, head_dim, theta)
        return SequenceAttention(rope, rope, None, mask)
    first_sink = sink_pos[:, 0] if per_block else sink_pos
    q_pos = torch.cat([first_sink.to(frame_pos), frame_pos], dim=-1)
    rope_q = _table(q_pos, h, w, head_dim, theta)
    if not per_block:
        return SequenceAttention(rope_q, rope_q, None, mask)
    k_pos = torch.cat([sink_pos.flatten(1).to(frame_pos), frame_pos], dim=-1)
    tokens = h * w
    sink_tokens = torch.arange(r * tokens, device=device)
    key_index = torch.cat([sink_tokens.repeat(blocks), torch.arange(r * tokens, (r + frames) * tokens, device=device)])
    return SequenceAttention(rope_q, _table(k_pos, h, w, head_dim, theta), key_index, mask)


@functools.lru_cache(maxsize=32)
def _mask(frames: int, frames_per_block: int, r: int, per_block: bool, causal: bool, window_blocks: int | None,
          tokens: int, device: str) -> torch.Tensor | None:
    """Token-level ``[L, S]`` mask (None when everything sees everything). The pattern depends only on shapes,
    so it is decided on the host and copied to the device once per shape."""
    block = torch.arange(frames) // frames_per_block
    if causal:
        seen = block[:, None] >= block[None, :]
        if window_blocks is not None:
            seen &= block[:, None] - block[None, :] <= window_blocks
    else:
        seen = torch.ones(frames, frames, dtype=torch.bool)
    copies = (frames // frames_per_block if per_block else 1) if r else 0
    sink_rows = torch.zeros(r, copies * r + frames, dtype=torch.bool)
    sink_rows[:, :r] = True  # the sink sees (its first copy of) itself only
    owner = block if per_block else torch.zeros_like(block)
    frame_sink = (owner[:, None] == torch.arange(copies)[None]).repeat_interleave(r, dim=1)
    visible = torch.cat([sink_rows, torch.cat([frame_sink, seen], dim=1)], dim=0)
    if visible.all():
        return None
    return visible.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1).to(device)
