"""Streaming benchmark: one forward per block, stream_batch over sequential, real-time factor, first-frame
delay, and peak memory after 100 vs many blocks. Every ratio is measured in this one run.

    python bench/stream.py                      # the tiny preset on whatever device is present
    python bench/stream.py --long-blocks 1000   # a quicker memory check

The last line is one JSON object: forward_ms, stream_batch_speedup, rtf, first_frame_s, memory_ratio, and the
host overhead figures host_ms_engine, host_ms_dit, host_overhead_ratio.

Host overhead: on the meta device no kernel runs, so the time of a forward there is the host's own work (Python,
op dispatch, RoPE tables, masks, cache bookkeeping), which on a GPU must stay far below the kernels' time.
``host_ms_engine`` is one cached engine forward of the ``--host-preset`` (wan2.1-1.3b) with a full window,
``host_ms_dit`` the bare full-sequence DiT forward of the same query tokens; their ratio is the engine's cost on
the host beyond the model's own (target <= 1.2).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from liveavatar.engine.batch import StreamBatchEngine  # noqa: E402
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore  # noqa: E402
from liveavatar.models import AvatarDiT, DiTConfig  # noqa: E402
from liveavatar.models.vae import build_vae  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def host_overhead(preset_name: str, repeats: int = 12) -> dict:
    """Median host time of one engine forward (full window) and one bare DiT forward of the same block on meta."""
    preset = OmegaConf.load(ROOT / "conf" / "model" / f"{preset_name}.yaml")
    cfg = DiTConfig.from_dict(OmegaConf.to_container(preset.dit, resolve=True))
    meta = torch.device("meta")
    with meta:
        model = AvatarDiT(cfg).to(torch.bfloat16).eval()
    space = 8  # Wan's VAE; the latent grid follows the preset's resolution
    h, w = (int(v) // space for v in preset.resolution)
    fpb = cfg.frames_per_block
    context = torch.randn(1, 64, cfg.text_dim, device=meta)
    reference = torch.randn(1, cfg.in_dim, 1, h, w, device=meta, dtype=torch.bfloat16)
    audio = (torch.randn(1, fpb, cfg.video_frames_per_latent, cfg.audio_layers_in, cfg.audio_feature_dim,
                         device=meta) if cfg.has_audio else None)
    settings = EngineSettings(steps=[1000.0], window_blocks=int(preset.get("window_blocks", 3)),
                              rope_policy=preset.rope.policy)
    core = StreamCore(model, settings, (cfg.in_dim, h, w), context, reference)
    full = settings.window_blocks + 2
    for _ in SequentialEngine(core).stream(audio for _ in range(full)):
        pass
    x = core.noise(0, 0).to(torch.bfloat16)
    t = core.step_timesteps(0)
    tokens = core.audio_tokens(audio)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:]) * 1000

    engine_ms = median_ms(lambda: core.forward(x, t, [0], [full], tokens, write=True))
    dit_ms = median_ms(lambda: model(x, t, context, audio=audio, reference=reference))
    return {"host_preset": preset_name, "host_ms_engine": round(engine_ms, 3), "host_ms_dit": round(dit_ms, 3),
            "host_overhead_ratio": round(engine_ms / dit_ms, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--blocks", type=int, default=24, help="blocks timed per engine")
    p.add_argument("--long-blocks", type=int, default=10_000, help="blocks of the memory run")
    p.add_argument("--steps", default="1000,750,500,250")
    p.add_argument("--host-preset", default="wan2.1-1.3b", help="preset of the meta-device host overhead figures")
    args = p.parse_args()
    host = host_overhead(args.host_preset)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(False)

    preset = OmegaConf.load(ROOT / "conf" / "model" / f"{args.preset}.yaml")
    cfg = DiTConfig.from_dict(OmegaConf.to_container(preset.dit, resolve=True))
    torch.manual_seed(0)
    model = AvatarDiT(cfg).to(device, dtype).eval()
    with torch.no_grad():  # a fresh Wan head is zero; give it weights so the run does real arithmetic
        model.head.head.weight.normal_(0, 0.02)
    vae_cfg = dict(OmegaConf.to_container(preset.vae))
    kind = vae_cfg.pop("kind")
    vae_cfg.pop("path", None)
    if kind != "patch":
        sys.exit(f"bench/stream.py decodes with the preset's VAE; preset {args.preset} needs VAE weights (kind {kind})")
    vae = build_vae(kind, None, **vae_cfg)
    h, w = (int(v) // vae.space_factor for v in preset.resolution)
    latent = (cfg.in_dim, h, w)
    steps = [float(s) for s in args.steps.split(",")]
    settings = EngineSettings(steps=steps, rope_policy=preset.rope.policy)
    context = torch.randn(1, 8, cfg.text_dim, device=device)
    reference = torch.randn(1, cfg.in_dim, 1, h, w, device=device, dtype=dtype)
    fpb = cfg.frames_per_block
    audio = (torch.randn(1, fpb, cfg.video_frames_per_latent, cfg.audio_layers_in, cfg.audio_feature_dim, device=device)
             if cfg.has_audio else None)
    block_seconds = fpb * vae.time_factor / float(preset.fps)

    def new_core():
        return StreamCore(model, settings, latent, context, reference)

    # One forward of one block against a full cache.
    core = new_core()
    for _ in SequentialEngine(core).stream(audio for _ in range(settings.window_blocks + 2)):
        pass
    x = core.noise(0, 0).to(dtype)
    t = core.timesteps[:1]
    times = []
    for i in range(30):
        sync(device)
        t0 = time.perf_counter()
        core.forward(x, t, [0], [settings.window_blocks + 2], core.audio_tokens(audio), write=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    forward_s = statistics.median(times[5:])

    def timed(engine_cls):
        core = new_core()
        decoder = vae.stream_decoder()
        marks = []
        sync(device)
        start = time.perf_counter()
        for _, x0 in engine_cls(core).stream(audio for _ in range(args.blocks)):
            decoder.decode(x0.float())
            sync(device)
            marks.append(time.perf_counter() - start)
        steady = (marks[-1] - marks[len(steps)]) / (len(marks) - 1 - len(steps))
        return marks[0], steady

    seq_first, seq_block = timed(SequentialEngine)
    batch_first, batch_block = timed(StreamBatchEngine)

    # Memory: peak after 100 blocks vs after the long run (constant if nothing grows with the video).
    core = new_core()
    marks = {}
    for b, _ in tqdm(SequentialEngine(core).stream(audio for _ in range(args.long_blocks)), total=args.long_blocks,
                     desc="memory run", unit="block", file=sys.stderr):
        if b + 1 in (100, args.long_blocks):
            marks[b + 1] = peak_memory_bytes(device)

    best_block = min(seq_block, batch_block)
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "preset": args.preset, "steps": len(steps),
        "forward_ms": round(forward_s * 1000, 3),
        "sequential_block_ms": round(seq_block * 1000, 3),
        "stream_batch_block_ms": round(batch_block * 1000, 3),
        "stream_batch_speedup": round(seq_block / batch_block, 3),
        "block_over_forward": round(best_block / forward_s, 3),
        "rtf": round(best_block / block_seconds, 4),
        "rtf_sequential": round(seq_block / block_seconds, 4),
        "first_frame_s": round(min(seq_first, batch_first), 4),
        "memory_blocks": [100, args.long_blocks],
        "memory_ratio": round(marks[args.long_blocks] / marks[100], 4),
        "cache_mb": round(core.cache.nbytes / 2**20, 3),
        **host,
    }
    print(f"one forward: {result['forward_ms']:.2f} ms; sequential block {result['sequential_block_ms']:.2f} ms, "
          f"stream_batch block {result['stream_batch_block_ms']:.2f} ms (x{result['stream_batch_speedup']:.2f})")
    print(f"real-time factor {result['rtf']:.3f} ({block_seconds:.2f} s of video per block); first frame "
          f"{result['first_frame_s']:.3f} s; peak memory after {args.long_blocks} blocks / after 100: "
          f"{result['memory_ratio']:.4f}")
    print(f"host work per forward on the meta device ({args.host_preset}): engine {host['host_ms_engine']:.2f} ms, "
          f"bare DiT {host['host_ms_dit']:.2f} ms, ratio {host['host_overhead_ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
