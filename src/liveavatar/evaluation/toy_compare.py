"""Trained vs untrained on held-out toy clips (``eval/toy_compare.py``): report, plot and a video."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import atomic, media
from ..components import SAMPLE_RATE, UserError, preset_fps
from ..data import toy
from ..metrics.toy import identity_error, score_video
from ..models import AvatarDiT, DiTConfig
from ..models.checkpoint import CheckpointError
from ..pipeline import engine_settings
from .toy_bench import ClipResult, ToyBenchSettings, run_toy_bench, summarise

SCORES = ("lip_sync", "identity_error", "identity_drift", "flicker")


class CompareError(ValueError):
    """A bad setting or checkpoint (one line for the user)."""


def bench_settings(cfg: DictConfig) -> ToyBenchSettings:
    preset = cfg.model
    if preset.vae.kind != "patch" or preset.audio_encoder.kind != "energy_mel":
        raise CompareError(f"model={preset.name}: the toy world needs the patch VAE and energy_mel audio (model=tiny)")
    try:
        fps = preset_fps(preset)
    except UserError as err:
        raise CompareError(str(err)) from err
    return ToyBenchSettings(clips=int(cfg.clips), seconds=float(cfg.seconds), seed=int(cfg.seed),
                            resolution=tuple(int(v) for v in preset.resolution),
                            space_factor=int(preset.vae.space_factor), n_mels=int(preset.audio_encoder.n_mels),
                            noise_seed=int(cfg.noise_seed), fps=fps)


def load_models(cfg: DictConfig) -> tuple[AvatarDiT, AvatarDiT]:
    """The trained checkpoint and the same architecture freshly initialised (``untrained_seed``)."""
    if not cfg.checkpoint or not Path(cfg.checkpoint).exists():
        raise CompareError(f"checkpoint={cfg.checkpoint}: not found (train it first: python train.py experiment=toy_df)")
    try:
        trained = AvatarDiT.from_pretrained(cfg.checkpoint)
    except CheckpointError as err:
        raise CompareError(f"checkpoint={cfg.checkpoint}: {err}") from err
    torch.manual_seed(int(cfg.untrained_seed))
    untrained = AvatarDiT(DiTConfig.from_dict(trained.config.to_dict()))
    return trained.eval().requires_grad_(False), untrained.eval().requires_grad_(False)


def ground_truth(bench: ToyBenchSettings) -> list[ClipResult]:
    """The renderer's own clips, scored like the generated ones (the best a model can do)."""
    results = []
    for i in range(bench.clips):
        clip = toy.make_clip(bench.seed + i, bench.frames, size=tuple(bench.resolution), fps=bench.fps,
                             sample_rate=SAMPLE_RATE)
        scores = score_video(clip.video, clip.reference, clip.wav, SAMPLE_RATE, bench.fps)
        results.append(ClipResult(bench.seed + i, scores.to_dict(),
                                  [float(v) for v in identity_error(clip.video, clip.reference)]))
    return results


def plot_identity(curves: dict[str, np.ndarray], out: Path, fps: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(np.arange(len(curve)) / fps, curve, label=name, lw=1.2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("identity error (mean over clips)")
    ax.set_title("identity error over time on held-out toy clips")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_video(path: Path, video: torch.Tensor, reference: torch.Tensor, wav: np.ndarray, scale: int,
                fps: float) -> None:
    """The reference (left) next to the generated frames (right), enlarged ``scale`` times, with the audio."""
    t = video.shape[1]
    side = torch.cat([reference[:, None].expand(-1, t, -1, -1), video], dim=3)  # [3, T, H, 2W]
    big = side.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    with media.VideoWriter(path, fps=fps, audio=wav, sample_rate=SAMPLE_RATE) as writer:
        writer.write(big.transpose(0, 1))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':14s}" + "".join(f"{k:>16s}" for k in SCORES)]
    for name, scores in rows.items():
        lines.append(f"{name:14s}" + "".join(f"{scores[k]:16.4f}" for k in SCORES))
    return "\n".join(lines)


@torch.no_grad()
def compare(cfg: DictConfig) -> str:
    """Run the comparison ``cfg`` describes; write the report files; return the printed table."""
    bench = bench_settings(cfg)
    try:
        settings = engine_settings(cfg)
    except ValueError as err:
        raise CompareError(str(err)) from err
    trained, untrained = load_models(cfg)
    if settings.sink != "none" and trained.config.reference != "sink":
        raise CompareError(f"engine.sink={settings.sink} needs a model with reference=sink "
                           f"(this one: {trained.config.reference}); pass engine.sink=none")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[ClipResult]] = {}
    with tqdm(total=2 * bench.clips, unit="clip", desc="streaming") as bar:
        for name, model in (("trained", trained), ("untrained", untrained)):
            try:
                results[name] = run_toy_bench(model, settings, bench, keep_videos=name == "trained",
                                              progress=lambda done, total: bar.update(1))
            except UserError as err:  # a preset or engine setting the streaming refuses
                raise CompareError(str(err)) from err
    results["ground_truth"] = ground_truth(bench)
    summary = {name: summarise(r) for name, r in results.items()}

    curves = {name: np.mean([r.identity_per_frame for r in rs], axis=0) for name, rs in results.items()}
    plot = plot_identity(curves, out / "identity_error.png", bench.fps)
    first = results["trained"][0]
    clip = toy.make_clip(first.seed, first.video.shape[1], size=tuple(bench.resolution), fps=bench.fps,
                         sample_rate=SAMPLE_RATE)
    write_video(out / "demo.mp4", first.video, clip.reference, first.wav, int(cfg.video_scale), bench.fps)

    report = {
        **summary,
        "per_clip": {name: [{"seed": r.seed, **r.scores} for r in rs] for name, rs in results.items()},
        "settings": {"checkpoint": str(cfg.checkpoint), "clips": bench.clips, "seconds": bench.seconds,
                     "engine": OmegaConf.to_container(cfg.engine, resolve=True),
                     "denoise": OmegaConf.to_container(cfg.denoise, resolve=True)},
    }
    atomic.write_json(out / "report.json", report)
    table = format_table(summary)
    files = ", ".join(str(p) for p in (out / "report.json", plot, out / "demo.mp4") if p is not None)
    return f"{table}\nwrote {files}"
