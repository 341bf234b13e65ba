"""Who attends to whom, and at which RoPE positions, in a full-sequence forward of
``[sink frames | context frames | clip frames]``.

The full-sequence forward is what training runs and what the streaming engine is checked against, so it
expresses every streaming policy: a block-causal mask with a history window (a block sees the sink, itself and
at most ``window_blocks`` earlier blocks), and a sink whose position may differ per query block (Rolling RoPE,
RAPR). The sink's own computation does not depend on where it sits (it attends only to itself, so only its
internal offsets matter); only the rotation of its keys does. A per-block sink is therefore one set of sink
tokens whose keys and values appear once per block, each copy rotated at that block's sink position and
visible to that block alone.

Context frames (Stage 1's motion frames) are noisy frames of the stream just before the clip that stand in for
the streaming engine's noisy KV cache: every clip block sees all of them whatever its window, they see the sink
(the first block's copy: they precede that block) and each other, and never the clip.

A sink may also hold tokens that are not whole frames (``sink_extra``: Live Avatar's FramePack motion tokens of
the reference), after its frames, at fixed angles of their own: they belong to every copy of the sink.
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


def _joined(tables: list[RotaryTable]) -> RotaryTable:
    """Concatenate tables along tokens, broadcasting shared ``[L, D/2]`` tables to the batch of ``[B, L, D/2]`` ones."""
    batch = max((t.cos.shape[0] for t in tables if t.cos.dim() == 3), default=None)
    if batch is not None:
        tables = [t if t.cos.dim() == 3 else RotaryTable.stack([t] * batch) for t in tables]
    return RotaryTable.cat(tables)


def sequence_attention(frame_pos: torch.Tensor, sink_pos: torch.Tensor | None, grid: tuple[int, int],
                       head_dim: int, theta: float, causal: bool, frames_per_block: int,
                       window_blocks: int | None = None, context_frames: int = 0,
                       sink_extra: torch.Tensor | None = None,
                       sink_visible: torch.Tensor | None = None) -> SequenceAttention:
    """Build the attention of a forward over ``R`` sink frames, ``K`` context frames and ``F`` clip frames.

    Args:
        frame_pos: ``[K + F]`` or ``[B, K + F]`` time positions of the context frames, then the clip frames.
        sink_pos: None (no sink), ``[R]`` / ``[B, R]`` (one sink for every frame), or ``[B, F / frames_per_block, R]``
            (block ``j`` sees the sink at ``sink_pos[:, j]``; causal only).
        grid: token rows and columns of a frame.
        causal: block-causal between blocks of ``frames_per_block`` clip frames (bidirectional inside a block);
            else every clip frame sees every clip frame.
        window_blocks: causal only: a block sees at most this many earlier blocks (None: all of them).
        context_frames: ``K``, the frames before the clip (see the module docstring).
        sink_extra: angles ``[M, head_dim / 2]`` of ``M`` tokens after the sink frames (part of the sink).
        sink_visible: ``[B, F / frames_per_block]`` bool (needs a sink per block): False hides block ``j``'s sink
            from it (``engine.sink=evicted`` trained: the reference leaves with the window); the mask becomes
            ``[B, 1, L, S]``.
    Sink frames see only the sink; every clip frame sees the sink and the context.
    """
    h, w = grid
    device = frame_pos.device
    frames = frame_pos.shape[-1] - context_frames
    per_block = sink_pos is not None and sink_pos.dim() == 3
    if per_block and not causal:
        raise ValueError("a sink position per block needs the block-causal mask")
    if sink_pos is not None and frame_pos.dim() == 2 and sink_pos.dim() == 1:
        sink_pos = sink_pos.expand(frame_pos.shape[0], -1)
    if sink_pos is not None and frame_pos.dim() == 1 and sink_pos.dim() >= 2:
        frame_pos = frame_pos.expand(sink_pos.shape[0], -1)
    r = 0 if sink_pos is None else sink_pos.shape[-1]
    extra = 0 if sink_extra is None else sink_extra.shape[0]
    if extra and not r:
        raise ValueError("extra sink tokens need a sink")
    blocks = frames // frames_per_block if causal else 1
    mask = _mask(frames, frames_per_block, r, per_block, causal, window_blocks, h * w, str(device), context_frames,
                 extra)
    if sink_visible is not None:
        if not per_block:
            raise ValueError("sink_visible hides each block's own sink: it needs a sink position per block")
        mask = _hide_sinks(mask, sink_visible.to(device), r * h * w + extra, context_frames + frames, h * w)

    if r == 0:
        rope = _table(frame_pos, h, w, head_dim, theta)
        return SequenceAttention(rope, rope, None, mask)
    extra_table = [RotaryTable(sink_extra.to(device))] if extra else []
    first_sink = sink_pos[:, 0] if per_block else sink_pos
    rope_q = _joined([_table(first_sink.to(frame_pos), h, w, head_dim, theta), *extra_table,
                      _table(frame_pos, h, w, head_dim, theta)])
    if not per_block:
        return SequenceAttention(rope_q, rope_q, None, mask)
    copies = [_table(sink_pos[:, j].to(frame_pos), h, w, head_dim, theta) for j in range(sink_pos.shape[1])]
    rope_k = _joined([t for copy in copies for t in (copy, *extra_table)] + [_table(frame_pos, h, w, head_dim, theta)])
    tokens = h * w
    sink_tokens = torch.arange(r * tokens + extra, device=device)
    rest = torch.arange(r * tokens + extra, (r + context_frames + frames) * tokens + extra, device=device)
    key_index = torch.cat([sink_tokens.repeat(blocks), rest])
    return SequenceAttention(rope_q, rope_k, key_index, mask)


def _hide_sinks(mask: torch.Tensor | None, sink_visible: torch.Tensor, sink_tokens: int, frames: int,
                tokens: int) -> torch.Tensor:
    """``mask`` (``[L, S]`` or None: all visible) with block ``j``'s sink copy hidden from the clip tokens of the
    clips where ``sink_visible[:, j]`` is False: ``[B, 1, L, S]``. The sink's own rows keep their columns (a row
    with nothing to attend to would give NaN, which masked values still carry into later layers)."""
    b, copies = sink_visible.shape
    device = sink_visible.device
    rows, columns = sink_tokens + frames * tokens, copies * sink_tokens + frames * tokens
    hidden = torch.cat([(~sink_visible).repeat_interleave(sink_tokens, dim=1),
                        torch.zeros(b, frames * tokens, dtype=torch.bool, device=device)], dim=1)   # [B, S]
    clip_rows = torch.arange(rows, device=device) >= sink_tokens                                      # [L]
    base = torch.ones(rows, columns, dtype=torch.bool, device=device) if mask is None else mask
    return (base[None] & ~(clip_rows[None, :, None] & hidden[:, None, :]))[:, None]


@functools.lru_cache(maxsize=32)
def _mask(frames: int, frames_per_block: int, r: int, per_block: bool, causal: bool, window_blocks: int | None,
          tokens: int, device: str, context: int = 0, extra: int = 0) -> torch.Tensor | None:
    """Token-level ``[L, S]`` mask (None when everything sees everything). The pattern depends only on shapes,
    so it is decided on the host and copied to the device once per shape. Rows: sink, context, clip; columns:
    the sink's copies, context, clip. The sink's ``extra`` tokens are one more unit of the sink."""
    sizes = [tokens] * r + ([extra] if extra else [])
    r = len(sizes)
    block = torch.arange(frames) // frames_per_block
    if causal:
        seen = block[:, None] >= block[None, :]
        if window_blocks is not None:
            seen &= block[:, None] - block[None, :] <= window_blocks
    else:
        seen = torch.ones(frames, frames, dtype=torch.bool)
    copies = (frames // frames_per_block if per_block else 1) if r else 0
    sink_rows = torch.zeros(r, copies * r + context + frames, dtype=torch.bool)
    sink_rows[:, :r] = True  # the sink sees (its first copy of) itself only
    owner = block if per_block else torch.zeros_like(block)
    frame_sink = (owner[:, None] == torch.arange(copies)[None]).repeat_interleave(r, dim=1)
    context_sink = (torch.arange(copies) == 0).expand(context, copies).repeat_interleave(r, dim=1)
    context_rows = torch.cat([context_sink, torch.ones(context, context, dtype=torch.bool),
                              torch.zeros(context, frames, dtype=torch.bool)], dim=1)
    clip_rows = torch.cat([frame_sink, torch.ones(frames, context, dtype=torch.bool), seen], dim=1)
    visible = torch.cat([sink_rows, context_rows, clip_rows], dim=0)
    if visible.all():
        return None
    rows = torch.tensor(sizes + [tokens] * (context + frames))
    columns = torch.tensor(sizes * copies + [tokens] * (context + frames)) if copies else rows
    return visible.repeat_interleave(rows, 0).repeat_interleave(columns, 1).to(device)
