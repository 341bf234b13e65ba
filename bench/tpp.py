"""TPP benchmark: the steady-state interval between finished blocks over one forward's time (ideal 1.0), the
first-frame delay, the real-time factor and the per-rank wait shares, all from one run of this script.

Two pipelines are launched with torchrun: the real one (tiny preset, as many ranks as there are cores, one
thread each) and a sleep one (4 steps + a decode rank, each forward replaced by a fixed sleep) that measures
the runtime's own overhead apart from compute. On GPUs the real run uses NCCL, one GPU per rank.

    python bench/tpp.py [--seconds 8] [--sleep-ms 50] [--ranks N]

The last line is one JSON object: interval_over_forward, interval_over_forward_sleep, first_frame_s, rtf.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from liveavatar.engine.stream import EngineSettings, StreamCore  # noqa: E402
from liveavatar.models import AvatarDiT, DiTConfig  # noqa: E402


def forward_seconds(threads: int) -> float:
    """Median time of one block forward of the tiny preset against a full cache, on this process."""
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    preset = OmegaConf.load(ROOT / "conf/model/tiny.yaml")
    cfg = DiTConfig.from_dict(OmegaConf.to_container(preset.dit))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AvatarDiT(cfg).to(device).eval()
    h, w = (int(v) // int(preset.vae.space_factor) for v in preset.resolution)
    core = StreamCore(model, EngineSettings(sink="reference"), (cfg.in_dim, h, w), torch.randn(1, 8, cfg.text_dim, device=device),
                      torch.randn(1, cfg.in_dim, 1, h, w, device=device), lanes=1)
    audio = core.audio_tokens(torch.randn(1, cfg.frames_per_block, 1, 1, cfg.audio_feature_dim))
    x = core.noise(0, 0)
    times = []
    for b in range(40):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        core.forward(x, core.timesteps[:1], [0], [b], audio, write=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def pipeline(nproc: int, steps: list[float], seconds: float, out: Path, *extra: str) -> dict:
    report = out / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "infer.py"), "engine=tpp", f"denoise.steps=[{','.join(str(int(s)) for s in steps)}]",
           f"max_seconds={seconds}", f"output.path={out}/out.mp4", f"output.report={report}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"torchrun failed:\n{r.stderr[-3000:]}")
    return json.loads(report.read_text())


def steady_interval(report: dict, skip: int) -> float:
    times = report["block_times"][skip:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of example speech to stream")
    p.add_argument("--sleep-ms", type=float, default=50.0)
    p.add_argument("--ranks", type=int, default=torch.cuda.device_count() or os.cpu_count() or 2)
    args = p.parse_args()

    ranks = max(2, args.ranks)
    # A separate decode rank when there is a core (GPU) for it; else the last step decodes.
    steps_n, decode_on_last = (ranks - 1, False) if ranks >= 4 else (ranks, True)
    steps = [1000.0 - i * 1000.0 / steps_n for i in range(steps_n)]
    forward = forward_seconds(1)
    with tempfile.TemporaryDirectory() as tmp:
        real = pipeline(ranks, steps, args.seconds, Path(tmp), f"engine.decode_on_last={str(decode_on_last).lower()}",
                        "engine.threads_per_rank=1")
    with tempfile.TemporaryDirectory() as tmp:
        sleep = pipeline(5, [1000, 750, 500, 250], args.seconds, Path(tmp),
                         f"engine.simulate_forward_ms={args.sleep_ms}")
    result = {
        "ranks": ranks, "steps": steps_n, "decode_on_last": decode_on_last,
        "forward_ms": round(forward * 1000, 3),
        "interval_ms": round(steady_interval(real, steps_n) * 1000, 3),
        "interval_over_forward": round(steady_interval(real, steps_n) / forward, 3),
        "interval_over_forward_sleep": round(steady_interval(sleep, 4) / (args.sleep_ms / 1000), 3),
        "first_frame_s": round(real["first_frame_s"], 4),
        "first_frame_over_forward": round(real["first_frame_s"] / forward, 2),
        "rtf": round(real["rtf"], 4),
        "wait_share": {r["role"]: round(r["wait_share"], 3) for r in real["ranks"]},
        "wait_share_sleep": {r["role"]: round(r["wait_share"], 3) for r in sleep["ranks"]},
    }
    print(f"real pipeline ({ranks} ranks, {steps_n} steps): block every {result['interval_ms']:.1f} ms, one forward "
          f"{result['forward_ms']:.1f} ms -> interval/forward {result['interval_over_forward']:.2f}; first frame "
          f"{result['first_frame_s']:.3f} s; real-time factor {result['rtf']:.3f}")
    print(f"sleep pipeline (5 ranks, {args.sleep_ms:.0f} ms per forward): interval/forward "
          f"{result['interval_over_forward_sleep']:.3f}")
    print("wait shares:", result["wait_share"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
