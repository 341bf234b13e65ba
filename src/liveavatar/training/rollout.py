"""Stage 2's Self-Forcing rollout: the causal generator makes its own history, through the streaming engine's
own forward (:class:`~liveavatar.engine.stream.StreamCore`), never a copy of the denoising loop.

Per iteration one exit step ``s`` is drawn (the same for every block and every rank). For each block, in order:
start from noise, run the steps before ``s`` without gradient (each clean estimate re-noised with fresh noise to
the next level), then step ``s`` with gradient: its clean estimate is the block's output. What the cache keeps of
the block (``distill.history``):

- ``corrupt`` (Live Avatar's History Corrupt, Algorithm 1): the keys and values of the exit-step forward itself,
  computed on the block's *noisy* input at step ``s``, detached; no extra forward. Training sees the noisy cache
  that timestep-forced inference sees.
- ``clean`` (Self-Forcing): after the exit step, the clean estimate is re-forwarded without gradient at
  ``context_noise`` to write the cache.
- ``fixed_noise``: the clean estimate, noised to one fixed level (``fixed_noise_t``, the paper's ablation uses
  557), is re-forwarded to write the cache.

Block-wise gradient accumulation (Live Avatar's Algorithm 2): :meth:`SelfForcingRollout.run` with
``keep_graph=False`` rolls out every block without gradient and records, per block, its exit-step input and audio;
:meth:`SelfForcingRollout.backward_blockwise` then re-runs one block at a time, with gradient, and back-propagates
that block's share of the loss gradient. The history is detached, so each block's gradient depends on no other
block's graph and their sum equals the one-shot gradient, while only one block's activations are alive at a time.

The re-runs go from the first block to the last, not last to first as Algorithm 2 is written: the order does not
change the sum, and in this order each re-run writes the cache the next one reads, as the rollout did (History
Corrupt: the re-run exit-step forward itself writes its keys and values; clean / fixed_noise: one extra forward
without gradient re-writes them). Nothing of the history has to be stored per block, so the memory a generator
step needs beyond one block's activations is the streaming cache's window, whatever the number of blocks (storing
each block's detached keys and values instead made the peak grow with the clip's length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..engine.stream import StreamCore

HISTORIES = ("corrupt", "clean", "fixed_noise")


@dataclass
class RolloutSettings:
    """``distill.*`` keys of the rollout."""

    history: str = "corrupt"
    context_noise: float = 0.0      # clean: the timestep of the re-forward that writes the cache
    fixed_noise_t: float = 557.0    # fixed_noise: the timestep the cache is written at

    def __post_init__(self):
        if self.history not in HISTORIES:
            raise ValueError(f"distill.history must be one of {HISTORIES}, got {self.history!r}")


@dataclass
class BlockRecord:
    """What block-wise accumulation needs to re-run a block's exit step: its input ``[1, C, F, H, W]`` and its
    audio features (the history it saw is rebuilt by re-running the blocks before it)."""

    block: int
    x_exit: torch.Tensor
    audio: torch.Tensor | None


class SelfForcingRollout:
    """Roll a causal generator out over one clip.

    Args:
        core: a fresh :class:`StreamCore` of the generator for this clip, with one cache lane.
        settings: history mode and noise levels.
    """

    def __init__(self, core: StreamCore, settings: RolloutSettings):
        if core.cache.lanes != 1:
            raise ValueError("the training rollout keeps one history per clip: build its StreamCore with lanes=1")
        self.core, self.settings = core, settings

    @property
    def steps(self) -> int:
        return len(self.core.timesteps)

    def exit_forward(self, x: torch.Tensor, block: int, step: int, grouped: torch.Tensor | None,
                     write: bool) -> torch.Tensor:
        """Clean estimate of block ``block`` from its input ``x`` at step ``step`` (with gradient if enabled)."""
        core = self.core
        v = core.forward(x, core.step_timesteps(step), [0], [block], core.audio_tokens(grouped), write=write)
        return core.step_output(x, v, step)

    def _denoise_to(self, block: int, exit_step: int, grouped) -> torch.Tensor:
        """The block's input at ``exit_step``: noise through the earlier steps, without gradient."""
        core = self.core
        x = core.noise(block, 0)
        with torch.no_grad():
            tokens = core.audio_tokens(grouped)
            for step in range(exit_step):
                v = core.forward(x, core.step_timesteps(step), [0], [block], tokens, write=False)
                x = core.renoise(core.step_output(x, v, step), block, step + 1)
        return x

    @torch.no_grad()
    def _write_history(self, x0: torch.Tensor, block: int, grouped) -> None:
        """clean / fixed_noise: re-forward the finished block to write the cache."""
        core, s = self.core, self.settings
        level = s.context_noise if s.history == "clean" else s.fixed_noise_t
        t = torch.full((1,), float(level), device=core.device)
        x = x0 if level == 0 else core.flow.add_noise(x0, core.noise(block, self.steps), t)
        core.forward(x, t, [0], [block], core.audio_tokens(grouped), write=True)

    def run(self, audio_blocks: Sequence[torch.Tensor | None], exit_step: int, keep_graph: bool = True
            ) -> tuple[torch.Tensor, list[BlockRecord]]:
        """Roll out ``len(audio_blocks)`` blocks exiting at ``exit_step``.

        Returns the video ``[1, C, blocks * F, H, W]`` (its blocks carry the exit steps' graphs if ``keep_graph``
        and gradients are enabled) and, without ``keep_graph``, the records :meth:`backward_blockwise` needs.
        """
        if not 0 <= exit_step < self.steps:
            raise ValueError(f"exit step {exit_step} outside the {self.steps} denoising steps")
        core, corrupt = self.core, self.settings.history == "corrupt"
        outputs, records = [], []
        for block, grouped in enumerate(audio_blocks):
            x = self._denoise_to(block, exit_step, grouped)
            if not keep_graph:
                records.append(BlockRecord(block, x, grouped))
            with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
                x0 = self.exit_forward(x, block, exit_step, grouped, write=corrupt)
            if not corrupt:
                self._write_history(x0.detach(), block, grouped)
            if block == 0:
                core.sink.first_block_done(x0.detach())
            outputs.append(x0)
        return torch.cat(outputs, dim=2), records

    def backward_blockwise(self, records: list[BlockRecord], exit_step: int, grad_video: torch.Tensor) -> None:
        """Accumulate into the generator's ``.grad`` the gradient of a loss whose gradient with respect to the
        rolled-out video is ``grad_video`` ``[1, C, blocks * F, H, W]``: block by block, first to last, each exit
        step re-run with gradient against the cache the re-runs before it rebuilt (see the module docstring).
        ``records`` is emptied as the blocks are done."""
        core, f = self.core, self.core.frames_per_block
        corrupt = self.settings.history == "corrupt"
        core.cache.rebuild(0, None, [])   # an empty lane: the sinks are written again as the blocks ask for them
        core.lane_sink_version[0] = -1
        while records:
            record = records.pop(0)
            with torch.enable_grad():
                x0 = self.exit_forward(record.x_exit, record.block, exit_step, record.audio, write=corrupt)
            x0.backward(grad_video[:, :, record.block * f : (record.block + 1) * f].to(x0.dtype))
            if not corrupt:
                self._write_history(x0.detach(), record.block, record.audio)
