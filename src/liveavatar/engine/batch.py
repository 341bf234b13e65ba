"""Stream batch on one device: the N in-flight blocks, each at a different denoising step, advance together
in one batched forward (StreamDiffusion's stream batch applied to a causal video DiT).

Lane ``s`` holds the block at step ``s`` and its own timestep-forced history, so each forward writes every
lane's history at that lane's noise level: exactly what the sequential engine computes with
``engine.history=timestep_forced``, in another order. Throughput is one (batched) forward per block; the first
block is out after N forwards.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .stream import StreamCore


class StreamBatchEngine:
    def __init__(self, core: StreamCore):
        core.require_step_pipeline("stream_batch")
        self.core = core

    @torch.no_grad()
    def stream(self, audio_blocks: Iterable[torch.Tensor | None]) -> Iterator[tuple[int, torch.Tensor]]:
        core = self.core
        n_steps = len(core.timesteps)
        # in_flight[s] = (block, x at step s, audio tokens) for the block now at step s, or None.
        in_flight: list[tuple[int, torch.Tensor, torch.Tensor | None] | None] = [None] * n_steps
        source = iter(audio_blocks)
        next_block, exhausted = 0, False
        while True:
            if not exhausted:
                try:
                    grouped = next(source)
                    in_flight[0] = (next_block, core.noise(next_block, 0), core.audio_tokens(grouped))
                    next_block += 1
                except StopIteration:
                    exhausted = True
            lanes = [s for s in range(n_steps) if in_flight[s] is not None]
            if not lanes:
                return
            blocks = [in_flight[s][0] for s in lanes]
            x = torch.cat([in_flight[s][1] for s in lanes])
            audio_list = [in_flight[s][2] for s in lanes]
            audio = torch.cat(audio_list) if audio_list[0] is not None else None
            t = core.step_timesteps(lanes[0], lanes[-1] + 1)
            v = core.forward(x, t, lanes, blocks, audio, write=True)
            x0 = core.flow.x0_from_velocity(x, v, t)
            advanced: list = [None] * n_steps
            for i, s in enumerate(lanes):
                b = blocks[i]
                if s + 1 < n_steps:
                    advanced[s + 1] = (b, core.renoise(x0[i : i + 1], b, s + 1), audio_list[i])
                else:
                    if b == 0:
                        core.sink.first_block_done(x0[i : i + 1])
                    yield b, x0[i : i + 1]
            in_flight = advanced
