"""Trained vs untrained on held-out toy clips (``eval/toy_compare.py``): report, plot and a video.

With ``dmd_checkpoint`` (a Stage 2 student), two more rows: ``dmd``, the student streamed with its few steps
(``dmd_denoise``), and ``trained_<n>step``, the Stage 1 model sampled with those same few steps, so the gain of
distillation over simply taking fewer steps is visible; ``dmd_vs_trained`` gives the student's relative gap to the
Stage 1 model at its full step count on lip sync and identity error.
"""
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
from ..training.export import TrainingCheckpointError, model_from_training_checkpoint
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


def load_checkpoint(key: str, path, hint: str) -> AvatarDiT:
    """The model at ``path`` (the config key ``key`` named it): an export folder or file, or a training run's
    ``.ckpt`` (its exported model at that step); otherwise one line naming the key."""
    if not path or not Path(path).exists():
        raise CompareError(f"{key}={path}: not found ({hint})")
    try:
        if Path(path).suffix == ".ckpt":  # a run's intermediate training checkpoint
            return model_from_training_checkpoint(path).requires_grad_(False)
        return AvatarDiT.from_pretrained(path).eval().requires_grad_(False)
    except (CheckpointError, TrainingCheckpointError) as err:
        raise CompareError(f"{key}={path}: {err}") from err


def with_denoise(cfg: DictConfig, denoise: DictConfig) -> DictConfig:
    """``cfg`` with its ``denoise.*`` replaced (the few-step rows stream with the student's steps)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    copy.denoise = OmegaConf.create(OmegaConf.to_container(denoise, resolve=True))
    return copy


def relative_gap(student: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """How far the student falls behind ``reference``, as a fraction of the reference: lip sync lower, identity
    error higher (positive = worse)."""
    return {"lip_sync": (reference["lip_sync"] - student["lip_sync"]) / abs(reference["lip_sync"]),
            "identity_error": (student["identity_error"] - reference["identity_error"]) / abs(reference["identity_error"])}


def load_models(cfg: DictConfig) -> tuple[AvatarDiT, AvatarDiT]:
    """The trained checkpoint and the same architecture freshly initialised (``untrained_seed``)."""
    trained = load_checkpoint("checkpoint", cfg.checkpoint, "train it first: python train.py experiment=toy_df")
    torch.manual_seed(int(cfg.untrained_seed))
    untrained = AvatarDiT(DiTConfig.from_dict(trained.config.to_dict()))
    return trained, untrained.eval().requires_grad_(False)


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


def format_table(rows: dict[str, dict[str, float]], forwards: dict[str, int] | None = None) -> str:
    forwards = forwards or {}
    lines = [f"{'':16s}{'steps':>6s}" + "".join(f"{k:>16s}" for k in SCORES)]
    for name, scores in rows.items():
        steps = str(forwards.get(name, "-"))
        lines.append(f"{name:16s}{steps:>6s}" + "".join(f"{scores[k]:16.4f}" for k in SCORES))
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
    runs = [("trained", trained, settings), ("untrained", untrained, settings)]
    few_step = None
    if cfg.get("dmd_checkpoint"):
        student = load_checkpoint("dmd_checkpoint", cfg.dmd_checkpoint, "distil it first: python distill.py experiment=toy_dmd")
        try:
            few = engine_settings(with_denoise(cfg, cfg.dmd_denoise))
        except ValueError as err:
            raise CompareError(str(err)) from err
        few_step = f"trained_{len(few.steps)}step"
        runs += [("dmd", student, few), (few_step, trained, few)]
    for name, model, run_settings in runs:
        if run_settings.sink != "none" and model.config.reference != "sink":
            raise CompareError(f"engine.sink={run_settings.sink} needs a model with reference=sink "
                               f"({name}: {model.config.reference}); pass engine.sink=none")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[ClipResult]] = {}
    with tqdm(total=len(runs) * bench.clips, unit="clip", desc="streaming") as bar:
        for name, model, run_settings in runs:
            try:
                results[name] = run_toy_bench(model, run_settings, bench, keep_videos=name == "trained",
                                              progress=lambda done, total: bar.update(1))
            except UserError as err:  # a preset or engine setting the streaming refuses
                raise CompareError(str(err)) from err
    results["ground_truth"] = ground_truth(bench)
    summary = {name: summarise(r) for name, r in results.items()}
    forwards = {name: len(run_settings.steps) for name, _, run_settings in runs}

    curves = {name: np.mean([r.identity_per_frame for r in rs], axis=0) for name, rs in results.items()}
    plot = plot_identity(curves, out / "identity_error.png", bench.fps)
    first = results["trained"][0]
    clip = toy.make_clip(first.seed, first.video.shape[1], size=tuple(bench.resolution), fps=bench.fps,
                         sample_rate=SAMPLE_RATE)
    write_video(out / "demo.mp4", first.video, clip.reference, first.wav, int(cfg.video_scale), bench.fps)

    report = {
        **summary,
        "per_clip": {name: [{"seed": r.seed, **r.scores} for r in rs] for name, rs in results.items()},
        "forwards_per_block": forwards,
        "settings": {"checkpoint": str(cfg.checkpoint), "clips": bench.clips, "seconds": bench.seconds,
                     "engine": OmegaConf.to_container(cfg.engine, resolve=True),
                     "denoise": OmegaConf.to_container(cfg.denoise, resolve=True)},
    }
    if few_step is not None:
        report["dmd_vs_trained"] = relative_gap(summary["dmd"], summary["trained"])
        report[f"{few_step}_vs_trained"] = relative_gap(summary[few_step], summary["trained"])
        report["settings"].update(dmd_checkpoint=str(cfg.dmd_checkpoint),
                                  dmd_denoise=OmegaConf.to_container(cfg.dmd_denoise, resolve=True))
    atomic.write_json(out / "report.json", report)
    table = format_table(summary, forwards)
    if few_step is not None:
        gap = report["dmd_vs_trained"]
        table += (f"\ndmd behind trained ({forwards['trained']} steps): lip sync {100 * gap['lip_sync']:+.1f}%, "
                  f"identity error {100 * gap['identity_error']:+.1f}% (positive: worse, negative: better), "
                  f"{forwards['trained'] / forwards['dmd']:.0f}x fewer forwards per block")
    files = ", ".join(str(p) for p in (out / "report.json", plot, out / "demo.mp4") if p is not None)
    return f"{table}\nwrote {files}"
