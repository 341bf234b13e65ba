"""Quality of a Stage 2 run as it trains: extend one ``distill.py`` run to each step count in turn and stream its
exported student over held-out toy clips after each (the motion-frame scaffold ablation of the README).

    python scripts/dmd_quality_curve.py --generator-from outputs/train/toy_df_motion/model --name motion \\
        --steps 25 50 100 150 >> curve.jsonl

Each line printed is one JSON object ``{"run", "step", "lip_sync", "identity_error", ...}``; step 0 is the Stage 1
model itself. The student streams as ``experiment=toy_dmd_sink`` distils it (4 steps, AAS, Rolling RoPE, a 2-block
window). Extra ``distill.py`` overrides follow ``--``.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def score(model_path: Path, clips: int, seconds: float) -> dict:
    import torch

    from liveavatar.engine.stream import EngineSettings
    from liveavatar.evaluation.toy_bench import ToyBenchSettings, run_toy_bench, summarise
    from liveavatar.models import AvatarDiT

    engine = EngineSettings(steps=[1000.0, 750.0, 500.0, 250.0], shift=1.0, sink="aas", history="timestep_forced",
                            window_blocks=2, rope_policy="rolling", rapr_distance=8)
    model = AvatarDiT.from_pretrained(model_path).eval()
    with torch.no_grad():
        return summarise(run_toy_bench(model, engine, ToyBenchSettings(clips=clips, seconds=seconds)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator-from", required=True, help="the Stage 1 export to distil")
    p.add_argument("--name", required=True, help="run name: outputs/distill/dmd_curve_<name>")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 150])
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("overrides", nargs="*", help="more distill.py overrides (after --)")
    args = p.parse_args()
    run = f"dmd_curve_{args.name}"
    print(json.dumps({"run": args.name, "step": 0, **score(Path(args.generator_from), args.clips, args.seconds)}),
          flush=True)
    for step in sorted(args.steps):
        cmd = [sys.executable, str(ROOT / "distill.py"), "experiment=toy_dmd_sink", f"generator_from={args.generator_from}",
               f"name={run}", f"trainer.max_steps={step}", "progress=false", *args.overrides]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ)
        if done.returncode:
            sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"distill.py failed at {step}")
        model = ROOT / "outputs" / "distill" / run / "model"
        print(json.dumps({"run": args.name, "step": step, **score(model, args.clips, args.seconds)}), flush=True)


if __name__ == "__main__":
    main()
