"""Peak memory of one Stage 2 generator step with 1, 3 and 7 blocks, one-shot versus block-wise gradient
accumulation (Live Avatar's Algorithm 2). Every figure comes from this one run.

A generator step here is the Self-Forcing rollout through the engine's forward plus the backward pass of a loss
on the whole rolled-out video, given its gradient with respect to the video (what DMD supplies; the teacher and
critic forwards that compute it run without gradient and are the same in both modes). One-shot keeps every
block's exit-step activations until the backward pass; block-wise re-runs one block at a time against the cache
it saw, so its peak should not grow with the number of blocks.

    python bench/dmd_memory.py                     # tiny-preset-sized model on the CPU (or the GPU if present)
    python bench/dmd_memory.py --dim 256 --layers 8

Peaks are measured above what every step holds alike: the model, and its gradient buffers, allocated before the
measurement as in every training step after the first (``zero_grad(set_to_none=False)``). Counted from no buffers
at all, a one-block step would look cheaper than it is: its gradient buffers appear only as its activations are
freed, while with several blocks the first block's gradients coexist with the next block's activations.

CPU peaks come from the profiler's allocation events (bytes allocated by tensors, not the process's RSS); CUDA
peaks from ``torch.cuda.max_memory_allocated``. The last line is one JSON object:
``{"peak_7_over_1_blockwise": ..., "peak_7_over_1_oneshot": ..., "step_s": ...}`` plus the raw peaks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from liveavatar.engine.stream import EngineSettings, StreamCore  # noqa: E402
from liveavatar.models import AvatarDiT, DiTConfig  # noqa: E402
from liveavatar.training.rollout import RolloutSettings, SelfForcingRollout  # noqa: E402


def peak_bytes(fn, device: torch.device) -> int:
    """Peak of tensor memory allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op event carries the bytes it allocated net of what it freed itself; "[memory]" events are frees
    # outside any op (a tensor going out of scope). Their running sum in time order is the live tensor memory.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument("--steps", default="1000,750,500,250")
    p.add_argument("--window-blocks", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = DiTConfig(in_dim=12, out_dim=12, dim=args.dim, ffn_dim=4 * args.dim, freq_dim=64, text_dim=32, text_len=16,
                    num_heads=args.dim // 32, num_layers=args.layers, frames_per_block=3, reference="sink")
    torch.manual_seed(0)
    model = AvatarDiT(cfg).to(device)
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0, 0.02)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)  # the buffers every step after the first holds (see the docstring)
    steps = [float(s) for s in args.steps.split(",")]
    exit_step = len(steps) - 1  # the most no-grad forwards; the graph is the exit step's in both modes
    context = torch.randn(1, 8, cfg.text_dim, device=device)
    reference = torch.randn(1, cfg.in_dim, 1, args.latent, args.latent, device=device)
    latent = (cfg.in_dim, args.latent, args.latent)

    def generator_step(blocks: int, blockwise: bool) -> None:
        settings = EngineSettings(steps=steps, window_blocks=args.window_blocks, sink="reference")
        rollout = SelfForcingRollout(StreamCore(model, settings, latent, context, reference, lanes=1), RolloutSettings())
        model.zero_grad(set_to_none=False)
        if blockwise:
            with torch.no_grad():
                video, records = rollout.run([None] * blocks, exit_step, keep_graph=False)
            rollout.backward_blockwise(records, exit_step, torch.ones_like(video) / video.numel())
        else:
            video, _ = rollout.run([None] * blocks, exit_step)
            video.mean().backward()

    peaks = {}
    for blockwise in (False, True):
        for blocks in (1, 3, 7):
            generator_step(blocks, blockwise)  # warm-up (allocator, RoPE tables)
            peaks[("blockwise" if blockwise else "oneshot", blocks)] = peak_bytes(
                lambda: generator_step(blocks, blockwise), device)
    start = time.perf_counter()
    generator_step(7, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start

    for mode in ("oneshot", "blockwise"):
        print(f"{mode:>9}: peak MiB with 1 / 3 / 7 blocks: "
              + " / ".join(f"{peaks[(mode, b)] / 2**20:.1f}" for b in (1, 3, 7)))
    result = {
        "peak_7_over_1_blockwise": round(peaks[("blockwise", 7)] / peaks[("blockwise", 1)], 3),
        "peak_7_over_1_oneshot": round(peaks[("oneshot", 7)] / peaks[("oneshot", 1)], 3),
        "step_s": round(step_s, 3),
        "peak_mib": {f"{m}_{b}": round(v / 2**20, 2) for (m, b), v in peaks.items()},
        "device": str(device), "dim": args.dim, "layers": args.layers, "latent": args.latent, "steps": len(steps),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
