"""The streaming core (one forward of one or more *lanes* against the KV cache) and the sequential engine.

A video is generated in blocks of ``frames_per_block`` latent frames. Each block is denoised with a few-step
list (``denoise.steps``): at step ``s`` the model predicts the velocity, the clean estimate is
``x0 = x - sigma_s v``, and the next input is ``x0`` re-noised to ``sigma_{s+1}`` with fresh noise. The noise of
block ``b`` at step ``s`` is drawn from a generator seeded by ``(seed, b, s)``, so any engine, whatever order it
runs the steps in, draws the same numbers.

History (``engine.history``):
- ``timestep_forced`` (Live Avatar): lane ``s`` caches the history at the noise level of step ``s``; the forward
  of step ``s`` writes its own keys and values, so no extra forward is needed (and a pipeline stage per step
  only ever touches its own lane).
- ``clean`` (Self-Forcing): one lane; after its last step the block is re-forwarded at ``t = context_noise``
  to write clean keys and values.

Sink motion (``model.sink_motion``, Live Avatar's release): FramePack motion tokens of clean latents before the
stream (the reference image held still) join the sink. They carry timestep 0, attend with the sink frames among
themselves, and keep their FramePack time positions (``-1``, ``-3``, ...) in the stream's frame numbering: seen
from a later block they lie as far behind it as those positions say, the Rolling RoPE moves only the sink frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from ..diffusion.flow import FlowSchedule
from ..models.attention import attend
from ..models.dit import AvatarDiT
from ..models.rope import RopeTables, RotaryTable
from .cache import KVCache
from .positions import PositionPolicy
from .sink import SinkSchedule, SinkState

HISTORIES = ("timestep_forced", "clean")


@dataclass
class EngineSettings:
    """The engine's knobs (Hydra: ``engine.*``, ``denoise.*``, ``model.rope.*``)."""

    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    shift: float = 5.0
    sink: str = "aas"
    keep_first_block: bool = False
    sink_switch_block: int | None = None
    history: str = "timestep_forced"
    window_blocks: int = 3
    rope_policy: str = "rolling"
    rapr_distance: int = 10
    rolling_offset: int | None = None
    context_noise: float = 0.0
    sink_motion: bool = False

    def __post_init__(self):
        if self.history not in HISTORIES:
            raise ValueError(f"engine.history must be one of {HISTORIES}, got {self.history!r}")
        if not self.steps:
            raise ValueError("denoise.steps must list at least one step")
        if self.window_blocks < 1:
            raise ValueError("model.window_blocks must be at least 1")

    @property
    def switch_block(self) -> int:
        if self.sink_switch_block is not None:
            return self.sink_switch_block
        # engine.sink=evicted: the reference leaves when a history frame at its place would leave the window.
        return self.window_blocks if self.sink == "evicted" else len(self.steps)


def block_noise(seed: int, block: int, step: int, shape, device, dtype=torch.float32) -> torch.Tensor:
    """Noise of block ``block`` at step ``step``: the same for every engine and rank."""
    state = np.random.SeedSequence([seed, block, step]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def lane_range(lanes: list[int]) -> slice:
    """The lanes of one forward as a slice: engines always run a contiguous range of lanes (the in-flight steps of
    stream_batch are consecutive), which lets the cache hand out views instead of gathering."""
    lo = lanes[0]
    if list(lanes) != list(range(lo, lo + len(lanes))):
        raise ValueError(f"a forward runs a contiguous range of cache lanes, got {list(lanes)}")
    return slice(lo, lo + len(lanes))


class CachedAttention:
    """Self-attention of the current blocks of ``lanes`` over their cache (sink + history) and themselves.

    Keys in the cache are un-rotated; they are rotated here at the positions the policy gives them from the
    current block. With ``write_starts`` the blocks' own keys and values are stored after attending.
    """

    def __init__(self, cache: KVCache, lanes: slice, rope_q: RotaryTable, rope_cache: RotaryTable,
                 mask: torch.Tensor | None, write_starts: list[int] | None, rope_fixed: RotaryTable | None = None):
        self.cache, self.lanes, self.rope_q, self.rope_cache = cache, lanes, rope_q, rope_cache
        self.mask, self.write_starts, self.rope_fixed = mask, write_starts, rope_fixed
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None
        self.written: set[int] = set()

    def freeze(self) -> None:
        """Read from a copy of the lanes' keys and values taken now (for a forward whose blocks may be recomputed
        in the backward pass, after later forwards changed the cache)."""
        self.frozen = (self.cache.k[:, self.lanes].clone(), self.cache.v[:, self.lanes].clone(),
                       self.cache.fixed_k[:, self.lanes].clone(), self.cache.fixed_v[:, self.lanes].clone())

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.frozen is None:
            ck, cv = self.cache.view(layer, self.lanes)
            fk, fv = self.cache.fixed_view(layer, self.lanes)
        else:
            ck, cv = self.frozen[0][layer].flatten(1, 2), self.frozen[1][layer].flatten(1, 2)
            fk, fv = self.frozen[2][layer], self.frozen[3][layer]
        if self.rope_fixed is None:
            keys = torch.cat([self.rope_cache.rotate(ck), self.rope_q.rotate(k)], dim=1)
            values = torch.cat([cv, v], dim=1)
        else:
            keys = torch.cat([self.rope_cache.rotate(ck), self.rope_fixed.rotate(fk), self.rope_q.rotate(k)], dim=1)
            values = torch.cat([cv, fv, v], dim=1)
        out = attend(self.rope_q.rotate(q), keys, values, self.mask)
        if self.write_starts is not None and layer not in self.written:  # a recomputation does not write again
            self.cache.write_history(layer, self.lanes, self.write_starts, k.detach(), v.detach())
            self.written.add(layer)
        return out


class SinkAttention:
    """Self-attention of the sink tokens among themselves; stores their keys/values in every lane's sink."""

    def __init__(self, cache: KVCache, lanes: slice, rope: RotaryTable):
        self.cache, self.lanes, self.rope = cache, lanes, rope

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write_sink(layer, self.lanes, k[0], v[0])
        return attend(self.rope.rotate(q), self.rope.rotate(k), v)


class StreamCore:
    """Model, conditioning, schedule and KV cache of one stream; runs forwards of several lanes at once.

    Everything a forward touches lives on the model's device: the cache, the RoPE tables (built there and
    cached by position), the attention masks (cached by fill pattern), the timesteps and the text's
    cross-attention keys and values (computed once per stream). The host keeps only bookkeeping (slot frames,
    block indices), so a forward never waits for the device.

    Args:
        model: the DiT (eval mode).
        settings: engine settings.
        latent_shape: ``(C, H, W)`` of one latent frame.
        context: ``[1, S, text_dim]`` text embeddings.
        reference: ``[1, C, 1, H, W]`` reference latent (the sink and/or the concat input), or None.
        lanes: lanes of the cache (one per step for ``timestep_forced``, else 1); a pipeline stage holds 1.
        sink_motion: ``[1, C, K, H, W]`` clean latents whose FramePack tokens join the sink (required with
            ``settings.sink_motion``; :func:`liveavatar.pipeline.still_motion_latents` makes them of the reference).
    """

    def __init__(self, model: AvatarDiT, settings: EngineSettings, latent_shape: tuple[int, int, int],
                 context: torch.Tensor, reference: torch.Tensor | None = None, seed: int = 0,
                 lanes: int | None = None, sink_motion: torch.Tensor | None = None):
        cfg = model.config
        self.model, self.settings, self.seed = model, settings, seed
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c, hh, ww = latent_shape
        if c != cfg.in_dim:
            raise ValueError(f"latents have {c} channels but the model takes in_dim={cfg.in_dim}")
        self.h, self.w = model.token_grid((hh, ww))
        self.latent_shape = latent_shape
        self.frames_per_block = f = cfg.frames_per_block
        self.flow = FlowSchedule(settings.shift)
        self.timesteps = self.flow.warp(settings.steps)
        self.timesteps_device = self.timesteps.to(self.device)
        if reference is not None and cfg.reference == "none":
            reference = None
        if settings.sink != "none" and cfg.reference != "sink":
            raise ValueError(f"engine.sink={settings.sink} needs a model with reference='sink' (this one: {cfg.reference!r})")
        self.reference = reference.to(device=self.device, dtype=self.dtype) if reference is not None else None
        self.sink = SinkSchedule(settings.sink, self.reference, f, settings.switch_block,
                                 settings.keep_first_block, cfg.reference_position)
        window_frames = settings.window_blocks * f
        self.positions = PositionPolicy(settings.rope_policy, f, window_frames, cfg.reference_position,
                                        settings.rolling_offset, settings.rapr_distance)
        if settings.sink != "evicted":  # an evicted reference sits where a history frame would: no clash
            self.positions.check(list(self.sink.trained_positions(0)))
        if self.sink.needs_first_block:
            self.positions.check(list(self.sink.trained_positions(1)), from_frame=settings.switch_block * f)
        n_lanes = lanes if lanes is not None else (len(settings.steps) if settings.history == "timestep_forced" else 1)
        self.rope = RopeTables(self.h, self.w, cfg.head_dim, cfg.rope_theta, self.device)
        self.sink_motion, self.motion_angles = self._sink_motion(sink_motion)
        self._motion_tables: dict[int, RotaryTable] = {}
        fixed = 0 if self.motion_angles is None else self.motion_angles.shape[0]
        self.cache = KVCache(cfg.num_layers, n_lanes, self.sink.capacity, window_frames, self.h * self.w,
                             cfg.num_heads, cfg.head_dim, self.dtype, self.device, fixed_tokens=fixed)
        self._masks: dict[tuple, torch.Tensor] = {}
        self.lane_sink_version = [-1] * n_lanes
        self.context = context.to(self.device)
        with torch.no_grad():
            self.text = model.text_kv(model.embed_text(self.context))

    def _sink_motion(self, latents: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Check and place the sink's motion latents; returns them and their tokens' RoPE angles ``[M, D/2]``."""
        if not self.settings.sink_motion:
            return None, None
        if self.settings.sink == "none":
            raise ValueError("model.sink_motion=true puts motion tokens into the sink, but engine.sink=none has none")
        if not hasattr(self.model, "frame_packer"):
            raise ValueError("model.sink_motion=true needs a model with a FramePack motion encoder (an s2v model "
                             "with framepack on)")
        if latents is None:
            raise ValueError("model.sink_motion=true: the engine needs the motion latents of the sink")
        if tuple(latents.shape[-2:]) != tuple(self.latent_shape[1:]) or latents.shape[1] != self.latent_shape[0]:
            raise ValueError(f"sink motion latents {tuple(latents.shape)} do not fit latents of shape {self.latent_shape}")
        latents = latents.to(device=self.device, dtype=self.dtype)
        cfg = self.model.config
        angles = self.model.frame_packer.angles(self.latent_shape[1:], cfg.head_dim, cfg.rope_theta, device=self.device)
        return latents, angles

    def motion_table(self, start: int) -> RotaryTable:
        """RoPE table of the sink's motion tokens seen from the block that starts at stream frame ``start``."""
        shift = self.positions.anchor(start) - start
        if shift not in self._motion_tables:
            if len(self._motion_tables) >= 64:
                self._motion_tables.clear()
            self._motion_tables[shift] = RotaryTable(self.rope.time_shift(self.motion_angles, shift))
        return self._motion_tables[shift]

    def require_step_pipeline(self, engine: str) -> None:
        """Raise unless the settings allow running the steps of different blocks at once (stream_batch, tpp):
        timestep-forced history (each step its own cache) and a sink that switches no earlier than block N."""
        settings, steps = self.settings, len(self.settings.steps)
        if settings.history != "timestep_forced":
            raise ValueError(
                f"engine={engine} needs engine.history=timestep_forced: the in-flight blocks are at different "
                "steps, and only the timestep-forced history gives each step its own cache"
            )
        if self.sink.needs_first_block and settings.switch_block < steps:
            raise ValueError(
                f"engine={engine} cannot switch the sink before block {steps} (the number of steps): "
                f"engine.sink_switch_block={settings.switch_block}"
            )

    # ------------------------------------------------------------------------------------------ helpers
    def block_shape(self) -> tuple[int, ...]:
        c, hh, ww = self.latent_shape
        return (1, c, self.frames_per_block, hh, ww)

    def noise(self, block: int, step: int) -> torch.Tensor:
        return block_noise(self.seed, block, step, self.block_shape(), self.device)

    def step_timesteps(self, lo: int, hi: int | None = None) -> torch.Tensor:
        """Timesteps of steps ``lo .. hi - 1`` on the device, ``[n]``."""
        return self.timesteps_device[lo : (lo + 1 if hi is None else hi)]

    def slot_positions(self, lane: int, start: int) -> tuple[int, ...]:
        """RoPE position of every cache slot of ``lane`` seen from the block starting at frame ``start`` (empty
        slots get 0: they are masked)."""
        policy, sink = self.positions, self.cache.sink_frames
        out = []
        for slot, frame in enumerate(self.cache.frame[lane]):
            if frame is None:
                out.append(0)
            elif slot < sink and self.sink.mode != "evicted":
                out.append(int(policy.sink_positions(frame, start)))
            else:  # history, and the evicted mode's reference: the frame before the stream, placed like history
                out.append(int(policy.frame_positions(frame, start)))
        return tuple(out)

    def attention_mask(self, lanes: list[int]) -> torch.Tensor | None:
        """``[n, 1, 1, slots * T + M + F * T]`` (True: may attend) for the lanes' filled slots, the sink's fixed
        tokens and their own block;
        None once every slot is filled. Cached by fill pattern (a handful while the cache fills up)."""
        pattern = tuple(self.cache.valid(lane) for lane in lanes)
        if all(all(p) for p in pattern):
            return None
        if pattern not in self._masks:
            own = [True] * self.frames_per_block
            frames = torch.tensor([list(p) + own for p in pattern])
            mask = frames.repeat_interleave(self.h * self.w, dim=1)
            slots = self.cache.slots * self.h * self.w  # the sink's fixed tokens sit between the slots and the block
            fixed = torch.ones(len(pattern), self.cache.fixed_tokens, dtype=torch.bool)
            mask = torch.cat([mask[:, :slots], fixed, mask[:, slots:]], dim=1)[:, None, None, :]
            if len(self._masks) >= 64:
                self._masks.clear()
            self._masks[pattern] = mask.to(self.device)
        return self._masks[pattern]

    # --------------------------------------------------------------------------------------------- sink
    @torch.no_grad()
    def ensure_sink(self, lane: int, block: int) -> None:
        """Make lane ``lane`` hold the sink that block ``block`` attends to."""
        state = self.sink.for_block(block)
        if self.lane_sink_version[lane] != state.version:
            self.write_sink(slice(lane, lane + 1), state)
            self.lane_sink_version[lane] = state.version

    def write_sink(self, lanes: slice, state: SinkState) -> None:
        """Run the sink tokens through the model (they see only themselves, at their training positions: only
        their offsets to each other matter) and store their un-rotated keys and values in ``lanes``. Every sink
        token carries timestep 0, so one modulation row serves them all."""
        if state.latents is None:  # no sink (any more): its slots become empty, hence masked
            self.cache.commit_sink(lanes, state.positions)
            return
        model = self.model
        tokens = model.embed_reference(state.latents)
        rope = self.rope.table(state.positions)
        if self.sink_motion is not None:
            motion, _ = model.embed_motion(self.sink_motion)
            tokens = torch.cat([tokens, motion], dim=1)
            rope = RotaryTable.cat([rope, RotaryTable(self.motion_angles)])
        _, e6 = model.time_modulation(torch.zeros(1, 1, device=self.device))
        model.run_blocks(tokens, e6, self.text, SinkAttention(self.cache, lanes, rope))
        self.cache.commit_sink(lanes, state.positions)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, lanes: list[int], blocks: list[int],
                audio: torch.Tensor | None, write: bool) -> torch.Tensor:
        """Velocity of the current blocks of ``lanes``.

        Engines call it without gradients. With gradients enabled (Stage 2 training rolls out through this same
        forward) the text is embedded anew so its weights get gradients, the cache the forward reads is frozen
        for its backward pass (a recomputed, gradient-checkpointed block sees the cache it saw, not the one
        later blocks wrote), and what it writes into the cache is detached: history never carries a graph.

        Args:
            x: ``[n, C, F, H, W]`` noisy block latents, one per lane.
            t: ``[n]`` timesteps (on the model's device: :meth:`step_timesteps`).
            lanes, blocks: the lane (a contiguous range) and the block index of each of the ``n`` inputs.
            audio: ``[n, F, A, audio_dim]`` audio tokens of the blocks, or None.
            write: store the blocks' keys/values as history of their lanes.
        Returns:
            ``[n, C, F, H, W]`` float32.
        """
        model, f = self.model, self.frames_per_block
        n = x.shape[0]
        for lane, block in zip(lanes, blocks):
            self.ensure_sink(lane, block)
        attention = self.plan_attention(lanes, blocks, write)
        text = self.text
        if torch.is_grad_enabled():
            attention.freeze()
            text = model.embed_text(self.context)
        tokens = model.embed_video(x, self.reference)
        e, e6 = model.time_modulation(t.to(self.device)[:, None].expand(n, f), audio)
        out = model.run_blocks(tokens, e6, text, attention, audio, 0)
        out = model.unpatchify(model.head(out, e).float(), f, self.latent_shape[1:])
        if write:
            self.cache.commit_history(attention.lanes, attention.write_starts, f)
        return out

    def plan_attention(self, lanes: list[int], blocks: list[int], write: bool) -> CachedAttention:
        """The host-side half of a forward: positions of the blocks and of every cache slot under the policy,
        their (cached) RoPE tables and the fill mask, for the blocks ``blocks`` of ``lanes``."""
        f = self.frames_per_block
        starts = [b * f for b in blocks]
        anchors = [self.positions.anchor(s) for s in starts]
        rope_q = self.rope.stacked(tuple(tuple(range(a, a + f)) for a in anchors))
        rope_cache = self.rope.stacked(tuple(self.slot_positions(lane, s) for lane, s in zip(lanes, starts)))
        rope_fixed = None
        if self.sink_motion is not None:
            tables = [self.motion_table(s) for s in starts]
            rope_fixed = tables[0] if all(t is tables[0] for t in tables) else RotaryTable.stack(tables)
        return CachedAttention(self.cache, lane_range(lanes), rope_q, rope_cache, self.attention_mask(lanes),
                               starts if write else None, rope_fixed)

    def audio_tokens(self, grouped: torch.Tensor | None) -> torch.Tensor | None:
        """One block's audio input (:meth:`AvatarDiT.audio_block_inputs`: grouped features
        ``[1, F, per_latent, layers, feat]``, or an s2v window) -> tokens ``[1, F, A, audio_dim]``."""
        if grouped is None or not self.model.config.has_audio:
            return None
        return self.model.embed_audio_block(grouped.to(self.device))

    def step_output(self, x: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        """Clean estimate ``x0`` from the velocity at step ``step`` (``[n, ...]``, one step for all)."""
        return self.flow.x0_from_velocity(x, v, self.step_timesteps(step).expand(x.shape[0]))

    def renoise(self, x0: torch.Tensor, block: int, step: int) -> torch.Tensor:
        """Input of step ``step`` of block ``block``: ``x0`` noised to that step's level with its own noise."""
        return self.flow.add_noise(x0, self.noise(block, step), self.step_timesteps(step))

    def write_clean(self, x0: torch.Tensor, block: int, audio: torch.Tensor | None) -> None:
        """Clean history: re-forward the finished block at ``t = context_noise`` to write its keys/values."""
        tc = torch.full((1,), float(self.settings.context_noise), device=self.device)
        x = x0 if self.settings.context_noise == 0 else self.flow.add_noise(
            x0, self.noise(block, len(self.settings.steps)), tc)
        self.forward(x, tc, [0], [block], audio, write=True)


class SequentialEngine:
    """One device, one forward after another: block by block, step by step."""

    def __init__(self, core: StreamCore):
        self.core = core

    @torch.no_grad()
    def stream(self, audio_blocks: Iterable[torch.Tensor | None]) -> Iterator[tuple[int, torch.Tensor]]:
        """Consume one grouped audio feature tensor (or None) per block; yield ``(block, x0 [1, C, F, H, W])``."""
        core = self.core
        timestep_forced = core.settings.history == "timestep_forced"
        for b, grouped in enumerate(audio_blocks):
            audio = core.audio_tokens(grouped)
            x = core.noise(b, 0)
            for s in range(len(core.timesteps)):
                lane = s if timestep_forced else 0
                v = core.forward(x, core.step_timesteps(s), [lane], [b], audio, write=timestep_forced)
                x0 = core.step_output(x, v, s)
                if s + 1 < len(core.timesteps):
                    x = core.renoise(x0, b, s + 1)
            if not timestep_forced:
                core.write_clean(x0, b, audio)
            if b == 0:
                core.sink.first_block_done(x0)
            yield b, x0
