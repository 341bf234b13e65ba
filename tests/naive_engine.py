"""The streaming engine written the plainest way, as an independent reference for the cached engines.

No ring buffer, no lanes array, no cached RoPE tables, no masks, no bounded positions: every denoising step
keeps a Python list of ``(frame, keys, values)`` per history frame, evicted by popping the oldest; every
position is the frame's stream index, and the sink's comes straight from the papers' formulas:

- absolute: the reference stays at its training position ``ref``;
- Rolling RoPE (Live Avatar, supplementary F): ``n + max(ref - n, k)``, the sink ``k`` frames ahead of the block
  at ``n`` (or at its training position while that is farther ahead);
- RAPR (StreamAvatar 3.1.1): ``n - min(n - ref, D)``, the distance to the reference capped at ``D``.

It shares only the model's layers (embeddings, blocks, head) with the engines under test.
"""
from __future__ import annotations

import torch

from liveavatar.diffusion.flow import FlowSchedule
from liveavatar.engine.stream import block_noise
from liveavatar.models.attention import attend
from liveavatar.models.rope import RotaryTable


def paper_sink_position(policy: str, n: int, ref: int, k: int, d: int) -> int:
    if policy == "absolute":
        return ref
    if policy == "rolling":
        return n + max(ref - n, k)
    if policy == "rapr":
        return n - min(n - ref, d)
    raise ValueError(policy)


class NaiveStream:
    def __init__(self, model, context, reference, *, steps, shift=5.0, sink="aas", keep_first_block=False,
                 history="timestep_forced", window_blocks=3, policy="rolling", rolling_offset=None,
                 rapr_distance=10, switch_block=None, context_noise=0.0, seed=0):
        self.model, self.reference, self.seed = model, reference, seed
        cfg = model.config
        self.f, self.ref = cfg.frames_per_block, cfg.reference_position
        self.flow = FlowSchedule(shift)
        self.ts = self.flow.warp(steps)
        self.sink_mode, self.keep_first_block, self.history = sink, keep_first_block, history
        self.window = window_blocks * self.f
        self.policy, self.k = policy, rolling_offset if rolling_offset is not None else self.f
        self.d, self.context_noise = rapr_distance, context_noise
        self.switch = switch_block if switch_block is not None else len(steps)
        with torch.no_grad():
            self.text = model.embed_text(context)
        self.lanes: dict[int, list] = {}      # lane -> [(frame, [k per layer], [v per layer])]
        self.first_block = None

    def rope(self, positions):
        cfg = self.model.config
        h = self.reference.shape[-2] // cfg.patch_size[1]
        w = self.reference.shape[-1] // cfg.patch_size[2]
        return RotaryTable.for_grid(torch.tensor(positions), h, w, cfg.head_dim, cfg.rope_theta)

    def sink_frames(self, block):
        """(latents [1, C, R, H, W], training positions) of the sink block ``block`` sees, or None."""
        if self.sink_mode in ("none", "evicted"):  # evicted: the reference is a history frame (see forward)
            return None
        if block < self.switch or not (self.sink_mode == "aas" or self.keep_first_block):
            return self.reference[:, :, :1], [self.ref]
        if self.sink_mode == "aas":
            return self.first_block[:, :, :1], [self.ref]
        return torch.cat([self.reference[:, :, :1], self.first_block], 2), [self.ref] + list(range(self.f))

    def sink_kv(self, latents, trained):
        """Per layer (k, v) of the sink frames, attending only to themselves at their training positions."""
        model, kvs = self.model, []
        rope = self.rope(trained)

        def attention(layer, q, k, v):
            kvs.append((k, v))
            return attend(rope.rotate(q), rope.rotate(k), v)

        _, e6 = model.time_modulation(torch.zeros(1, len(trained)))
        model.run_blocks(model.embed_reference(latents), e6, self.text, attention)
        return kvs

    @torch.no_grad()
    def forward(self, x, t, lane, block, audio, write):
        model, f = self.model, self.f
        n = block * f
        if lane not in self.lanes:
            # sink=evicted: the reference is the history frame before the stream, evicted like any other
            kvs = self.sink_kv(self.reference[:, :, :1], [self.ref]) if self.sink_mode == "evicted" else None
            self.lanes[lane] = [(self.ref, [k for k, _ in kvs], [v for _, v in kvs])] if kvs else []
        past = self.lanes[lane]
        sink = self.sink_frames(block)
        keys_pos, sink_kv = [], None
        if sink is not None:
            latents, trained = sink
            sink_kv = self.sink_kv(latents, trained)
            base = paper_sink_position(self.policy, n, self.ref, self.k, self.d)
            keys_pos += [base + p - self.ref for p in trained]
        keys_pos += [frame for frame, _, _ in past] + list(range(n, n + f))
        rope_k, rope_q = self.rope(keys_pos), self.rope(list(range(n, n + f)))
        written = []

        def attention(layer, q, k, v):
            ks = ([sink_kv[layer][0]] if sink_kv else []) + [e[1][layer] for e in past] + [k]
            vs = ([sink_kv[layer][1]] if sink_kv else []) + [e[2][layer] for e in past] + [v]
            written.append((k, v))
            return attend(rope_q.rotate(q), rope_k.rotate(torch.cat(ks, 1)), torch.cat(vs, 1))

        tokens = model.embed_video(x, self.reference)
        e, e6 = model.time_modulation(t.reshape(1, 1).expand(1, f), audio)
        out = model.run_blocks(tokens, e6, self.text, attention, audio, 0)
        v = model.unpatchify(model.head(out, e).float(), f, x.shape[-2:])
        if write:
            per_frame = x.shape[-2] * x.shape[-1] // (model.config.patch_size[1] * model.config.patch_size[2])
            for i in range(f):
                sl = slice(i * per_frame, (i + 1) * per_frame)
                past.append((n + i, [k[:, sl] for k, _ in written], [v_[:, sl] for _, v_ in written]))
            while len(past) > self.window:
                past.pop(0)  # evict the oldest frame
        return v

    def run(self, audio_blocks):
        """Clean latents of every block, concatenated on frames ``[1, C, blocks * F, H, W]``."""
        model, out = self.model, []
        tf = self.history == "timestep_forced"
        for b, grouped in enumerate(audio_blocks):
            audio = model.audio_proj.project_grouped(grouped) if grouped is not None and model.audio_proj else None
            shape = (1, model.config.in_dim, self.f, *self.reference.shape[-2:])
            x = block_noise(self.seed, b, 0, shape, "cpu")
            for s, t in enumerate(self.ts):
                v = self.forward(x, t, s if tf else 0, b, audio, write=tf)
                x0 = self.flow.x0_from_velocity(x, v, t.reshape(1))
                if s + 1 < len(self.ts):
                    x = self.flow.add_noise(x0, block_noise(self.seed, b, s + 1, shape, "cpu"), self.ts[s + 1].reshape(1))
            if not tf:
                tc = torch.tensor([float(self.context_noise)])
                xc = x0 if self.context_noise == 0 else self.flow.add_noise(
                    x0, block_noise(self.seed, b, len(self.ts), shape, "cpu"), tc)
                self.forward(xc, tc, 0, b, audio, write=True)
            if b == 0:
                self.first_block = x0
            out.append(x0)
        return torch.cat(out, dim=2)
