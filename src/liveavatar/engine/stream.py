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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from ..diffusion.flow import FlowSchedule
from ..models.attention import attend
from ..models.dit import AvatarDiT
from ..models.rope import RotaryTable
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
    context_noise: float = 0.0

    def __post_init__(self):
        if self.history not in HISTORIES:
            raise ValueError(f"engine.history must be one of {HISTORIES}, got {self.history!r}")
        if not self.steps:
            raise ValueError("denoise.steps must list at least one step")
        if self.window_blocks < 1:
            raise ValueError("engine.window_blocks must be at least 1")

    @property
    def switch_block(self) -> int:
        return self.sink_switch_block if self.sink_switch_block is not None else len(self.steps)


def block_noise(seed: int, block: int, step: int, shape, device, dtype=torch.float32) -> torch.Tensor:
    """Noise of block ``block`` at step ``step``: the same for every engine and rank."""
    state = np.random.SeedSequence([seed, block, step]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


class CachedAttention:
    """Self-attention of the current blocks of ``lanes`` over their cache (sink + history) and themselves.

    Keys in the cache are un-rotated; they are rotated here at the positions the policy gives them from the
    current block. With ``write_frames`` the blocks' own keys and values are stored after attending.
    """

    def __init__(self, cache: KVCache, lanes: torch.Tensor, rope_q: RotaryTable, rope_cache: RotaryTable,
                 mask: torch.Tensor | None, write_frames: torch.Tensor | None):
        self.cache, self.lanes, self.rope_q, self.rope_cache = cache, lanes, rope_q, rope_cache
        self.mask, self.write_frames = mask, write_frames

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.keys(layer, self.lanes)
        keys = torch.cat([self.rope_cache.rotate(ck).to(k.dtype), self.rope_q.rotate(k)], dim=1)
        values = torch.cat([cv.to(v.dtype), v], dim=1)
        out = attend(self.rope_q.rotate(q), keys, values, self.mask)
        if self.write_frames is not None:
            self.cache.write_history(layer, self.lanes, self.write_frames, k, v)
        return out


class SinkAttention:
    """Self-attention of the sink frames among themselves; stores their keys/values in every lane's sink."""

    def __init__(self, cache: KVCache, lanes: torch.Tensor, rope: RotaryTable):
        self.cache, self.lanes, self.rope = cache, lanes, rope

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write_sink(layer, self.lanes, k[0], v[0])
        return attend(self.rope.rotate(q), self.rope.rotate(k), v)


class StreamCore:
    """Model, conditioning, schedule and KV cache of one stream; runs forwards of several lanes at once.

    Args:
        model: the DiT (eval mode).
        settings: engine settings.
        latent_shape: ``(C, H, W)`` of one latent frame.
        context: ``[1, S, text_dim]`` text embeddings.
        reference: ``[1, C, 1, H, W]`` reference latent (the sink and/or the concat input), or None.
        lanes: lanes of the cache (one per step for ``timestep_forced``, else 1); a pipeline stage holds 1.
    """

    def __init__(self, model: AvatarDiT, settings: EngineSettings, latent_shape: tuple[int, int, int],
                 context: torch.Tensor, reference: torch.Tensor | None = None, seed: int = 0,
                 lanes: int | None = None):
        cfg = model.config
        self.model, self.settings, self.seed = model, settings, seed
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c, hh, ww = latent_shape
        if c != cfg.in_dim:
            raise ValueError(f"latents have {c} channels but the model takes in_dim={cfg.in_dim}")
        self.h, self.w = model.token_grid((hh, ww))
        self.latent_shape = latent_shape
        self.frames_per_block = cfg.frames_per_block
        self.flow = FlowSchedule(settings.shift)
        self.timesteps = self.flow.warp(settings.steps)
        self.sigmas = self.timesteps / self.flow.num_train_timesteps
        if reference is not None and cfg.reference == "none":
            reference = None
        if settings.sink != "none" and cfg.reference != "sink":
            raise ValueError(f"engine.sink={settings.sink} needs a model with reference='sink' (this one: {cfg.reference!r})")
        self.reference = reference.to(self.device) if reference is not None else None
        self.sink = SinkSchedule(settings.sink, self.reference, self.frames_per_block, settings.switch_block,
                                 settings.keep_first_block)
        window_frames = settings.window_blocks * self.frames_per_block
        self.positions = PositionPolicy(settings.rope_policy, window_frames, settings.rapr_distance)
        n_lanes = lanes if lanes is not None else (len(settings.steps) if settings.history == "timestep_forced" else 1)
        self.cache = KVCache(cfg.num_layers, n_lanes, self.sink.capacity, window_frames, self.h * self.w,
                             cfg.num_heads, cfg.head_dim, self.dtype, self.device)
        self.lane_sink_version = [-1] * n_lanes
        with torch.no_grad():
            self.context = model.embed_text(context.to(self.device))

    def require_step_pipeline(self, engine: str) -> None:
        """Raise unless the settings allow running the steps of different blocks at once (stream_batch, tpp):
        timestep-forced history (each step its own cache) and a sink that switches no earlier than block N."""
        settings, steps = self.settings, len(self.settings.steps)
        if settings.history != "timestep_forced":
            raise ValueError(
                f"engine={engine} needs engine.history=timestep_forced: the in-flight blocks are at different "
                "steps, and only the timestep-forced history gives each step its own cache"
            )
        if self.sink.changes and settings.switch_block < steps:
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

    def _rope(self, positions: torch.Tensor) -> RotaryTable:
        return RotaryTable.for_grid(positions, self.h, self.w, self.model.config.head_dim, self.model.config.rope_theta)

    # --------------------------------------------------------------------------------------------- sink
    @torch.no_grad()
    def ensure_sink(self, lane: int, block: int) -> None:
        """Make lane ``lane`` hold the sink that block ``block`` attends to."""
        state = self.sink.for_block(block)
        if self.lane_sink_version[lane] != state.version:
            self.write_sink(torch.tensor([lane]), state)
            self.lane_sink_version[lane] = state.version

    def write_sink(self, lanes: torch.Tensor, state: SinkState) -> None:
        if state.latents is None:
            return
        model = self.model
        tokens = model.embed_reference(state.latents)
        r = state.latents.shape[2]
        _, e6 = model.time_modulation(torch.zeros(1, r, device=self.device))
        model.run_blocks(tokens, e6, self.context, SinkAttention(self.cache, lanes, self._rope(state.positions)))
        self.cache.commit_sink(lanes, state.positions)

    # ------------------------------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, lanes: list[int], blocks: list[int],
                audio: torch.Tensor | None, write: bool) -> torch.Tensor:
        """Velocity of the current blocks of ``lanes``.

        Args:
            x: ``[n, C, F, H, W]`` noisy block latents, one per lane.
            t: ``[n]`` timesteps.
            lanes, blocks: the lane and the block index of each of the ``n`` inputs.
            audio: ``[n, F, A, audio_dim]`` audio tokens of the blocks, or None.
            write: store the blocks' keys/values as history of their lanes.
        Returns:
            ``[n, C, F, H, W]`` float32.
        """
        model, f = self.model, self.frames_per_block
        n = x.shape[0]
        for lane, block in zip(lanes, blocks):
            self.ensure_sink(lane, block)
        lane_t = torch.tensor(lanes)
        starts = [b * f for b in blocks]
        frames = torch.stack([torch.arange(s, s + f) for s in starts])  # [n, F]
        rope_q = RotaryTable.stack([self._rope(self.positions.positions(fr, s)) for fr, s in zip(frames, starts)])
        slot_pos = []
        for lane, s in zip(lanes, starts):
            pos = self.cache.frame[lane].clone()
            hist = slice(self.cache.sink_frames, None)
            pos[hist] = self.positions.positions(pos[hist], s)
            slot_pos.append(pos)
        rope_cache = RotaryTable.stack([self._rope(p) for p in slot_pos])
        valid = self.cache.key_mask(lane_t)
        mask = None
        if not bool(valid.all()):
            own = torch.ones(n, f * self.h * self.w, dtype=torch.bool, device=self.device)
            mask = torch.cat([valid, own], dim=1)[:, None, None, :]
        attention = CachedAttention(self.cache, lane_t, rope_q, rope_cache, mask, frames if write else None)

        tokens = model.embed_video(x, self.reference)
        e, e6 = model.time_modulation(t.to(self.device)[:, None].expand(n, f), audio)
        context = self.context.expand(n, -1, -1)
        out = model.run_blocks(tokens, e6, context, attention, audio, 0)
        out = model.unpatchify(model.head(out, e).float(), f, self.latent_shape[1:])
        if write:
            self.cache.commit_history(lane_t, frames)
        return out

    def audio_tokens(self, grouped: torch.Tensor | None) -> torch.Tensor | None:
        """Grouped block features ``[1, F, per_latent, layers, feat]`` -> tokens ``[1, F, per_latent, audio_dim]``."""
        if grouped is None or self.model.audio_proj is None:
            return None
        with torch.no_grad():
            return self.model.audio_proj.project_grouped(grouped.to(self.device))

    def step_output(self, x: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
        """Clean estimate ``x0`` from the velocity at step ``step`` (``[n, ...]``, one step for all)."""
        return self.flow.x0_from_velocity(x, v, self.timesteps[step].expand(x.shape[0]).to(x.device))

    def renoise(self, x0: torch.Tensor, block: int, step: int) -> torch.Tensor:
        """Input of step ``step`` of block ``block``: ``x0`` noised to that step's level with its own noise."""
        t = self.timesteps[step].reshape(1).to(x0.device)
        return self.flow.add_noise(x0, self.noise(block, step), t)

    def write_clean(self, x0: torch.Tensor, block: int, audio: torch.Tensor | None) -> None:
        """Clean history: re-forward the finished block at ``t = context_noise`` to write its keys/values."""
        tc = float(self.settings.context_noise)
        x = x0 if tc == 0 else self.flow.add_noise(x0, self.noise(block, len(self.settings.steps)), torch.tensor([tc]))
        self.forward(x, torch.tensor([tc]), [0], [block], audio, write=True)


class SequentialEngine:
    """One device, one forward after another: block by block, step by step."""

    def __init__(self, core: StreamCore):
        self.core = core

    def stream(self, audio_blocks: Iterable[torch.Tensor | None]) -> Iterator[tuple[int, torch.Tensor]]:
        """Consume one grouped audio feature tensor (or None) per block; yield ``(block, x0 [1, C, F, H, W])``."""
        core = self.core
        timestep_forced = core.settings.history == "timestep_forced"
        for b, grouped in enumerate(audio_blocks):
            audio = core.audio_tokens(grouped)
            x = core.noise(b, 0)
            for s in range(len(core.timesteps)):
                lane = s if timestep_forced else 0
                v = core.forward(x, core.timesteps[s].reshape(1), [lane], [b], audio, write=timestep_forced)
                x0 = core.step_output(x, v, s)
                if s + 1 < len(core.timesteps):
                    x = core.renoise(x0, b, s + 1)
            if not timestep_forced:
                core.write_clean(x0, b, audio)
            if b == 0:
                core.sink.first_block_done(x0)
            yield b, x0
