"""GenBench's runner (``eval/genbench.py``): stream every case of a suite through one loaded pipeline, write the
videos, score each case over the whole video and over time windows, and aggregate per suite, per tag and per
window into ``results.json``, ``report.md`` and ``report.html`` (:mod:`.genbench_report`).

- Resumable: a finished case leaves ``cases/<id>/scores.json`` (written last, atomically) and is skipped by the
  next run of the same command; a failed case prints one line and the run goes on (it is retried next time).
- Timing per case, on the stream as a live client sees it: TTFF (Live Avatar's definition: the wait for the first
  block's audio to arrive, plus that block's denoising and decode), FPS (frames / compute seconds) and the
  real-time factor (compute seconds / seconds of video; below 1 is faster than real time).
- Frames are kept as uint8 on the CPU for scoring (``[T, 3, H, W]``: about 0.9 MB a frame at 720x400). A case
  whose frames would take more than ``keep_whole_gb`` keeps only its windows' frames and is scored over its
  windows alone (the stress test's 10,000 s at 720x400 would need ~200 GB); its video is still written whole.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .. import atomic, media
from ..components import SAMPLE_RATE, UserError, frames_in
from ..engine.tpp import GroupFailure
from ..metrics.toy import identity_error, interaction_scores
from ..pipeline import LiveAvatarPipeline
from .scoring import Scorer, parse_windows, score_case, window_slices
from .suites import Case, SuiteError, case_inputs, load_manifest, toy_interactive_suite, toy_long_suite, toy_suite

# The paper's long-horizon stress test windows (seconds).
PAPER_WINDOWS = [[0, 10], [100, 110], [1000, 1010], [10000, 10010]]
CURVE_POINTS = 400     # per-frame curves kept in a case's scores are thinned to at most this many points
FID_FEATURES = "inception.npz"  # a case's FID features (generated and ground-truth frames), beside scores.json


class GenBenchError(ValueError):
    """A setting the benchmark cannot run with (one line for the user)."""


def suite_cases(cfg: DictConfig) -> tuple[str, list[Case], list]:
    """``(suite name, cases, default windows)`` of ``cfg.bench``: ``toy``, ``toy_long`` or a manifest path."""
    bench = str(cfg.bench)
    if bench == "toy":
        t = cfg.toy
        return "toy", toy_suite(int(t.clips), float(t.seconds), int(t.seed)), []
    if bench == "toy_long":
        t = cfg.toy_long
        cases = toy_long_suite(int(t.clips), float(t.seconds), int(t.seed), float(t.loop_seconds))
        return "toy_long", cases, OmegaConf.to_container(t.windows, resolve=True)
    if bench == "toy_interactive":
        t = cfg.toy_interactive
        return "toy_interactive", toy_interactive_suite(int(t.clips), float(t.seconds), int(t.seed)), []
    return Path(bench).stem, load_manifest(bench), PAPER_WINDOWS


def build_scorer(cfg: DictConfig) -> Scorer:
    """The metrics of this run (the weight-free ones always; weighted ones when ``metrics.*`` name weights)."""
    from .metric_set import frame_features, general_metrics, video_features

    paths = cfg.get("metrics") or {}
    return Scorer(general=general_metrics(paths), video_features=video_features(paths),
                  frame_features=frame_features(paths))


def thin(curve: np.ndarray, points: int = CURVE_POINTS) -> list[float]:
    """At most ``points`` evenly spaced samples of a per-frame curve (for plots)."""
    idx = np.linspace(0, len(curve) - 1, min(points, len(curve))).round().astype(int)
    return [float(curve[i]) for i in idx]


@dataclass
class StreamedCase:
    frames: torch.Tensor | None                 # [3, T, H, W] float in [-1, 1] (from uint8); None: not all kept
    timing: dict[str, float]
    windows: dict[str, torch.Tensor] = field(default_factory=dict)   # kept windows' frames when ``frames`` is None
    total_frames: int = 0


class FrameKeeper:
    """Keeps, as uint8, the frames scoring needs: all of them, or only those inside ``ranges`` (name -> frame slice),
    for a video too long to hold (the stress test's 10,000 s at 720x400 would be ~200 GB)."""

    def __init__(self, ranges: dict[str, slice] | None):
        self.ranges, self.seen = ranges, 0
        self.chunks: dict[str | None, list[torch.Tensor]] = {None: []} if ranges is None else {n: [] for n in ranges}

    def add(self, frames: torch.Tensor) -> None:
        """The next frames ``[T, 3, H, W]`` in [-1, 1] of the stream."""
        start, self.seen = self.seen, self.seen + frames.shape[0]
        if self.ranges is None:
            self.chunks[None].append(media.to_uint8(frames))
            return
        for name, r in self.ranges.items():
            a, b = max(r.start, start), min(r.stop, self.seen)
            if a < b:
                self.chunks[name].append(media.to_uint8(frames[a - start : b - start]))

    @staticmethod
    def _video(chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(chunks).float().div(127.5).sub(1.0).transpose(0, 1)

    def result(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if self.ranges is None:
            return self._video(self.chunks[None]), {}
        return None, {n: self._video(c) for n, c in self.chunks.items() if c}


def stream_case(pipe, image, wav: np.ndarray, prompt: str, seed: int, video_path: Path,
                keep: dict[str, slice] | None = None, listen: np.ndarray | None = None,
                speaking: np.ndarray | str | None = None, progress: bool = False) -> StreamedCase | None:
    """Stream one case, writing ``video_path`` (with its audio) as blocks arrive; time it as a live client would.
    ``pipe``: a :class:`LiveAvatarPipeline` or, on a rank of a TPP group, a :class:`TPPPipeline` (None on the ranks
    that do not output). ``keep``: hold only these frame ranges for scoring (None: every frame). ``listen``,
    ``speaking``: a conversation's other voice and turns (a listening model). ``progress``: a bar over the case's blocks
    (a long case streams for minutes)."""
    fps = pipe.fps
    stream = pipe.stream(image, wav, prompt, seed=seed, listen_audio=listen, audio_mask=speaking)
    if stream is None:
        return None
    keeper = FrameKeeper(keep)
    start = time.perf_counter()
    first_block_s, first_frames = None, 0
    with media.VideoWriter(video_path, fps=fps, audio=wav, sample_rate=SAMPLE_RATE) as writer, \
            tqdm(total=stream.blocks, unit="block", desc=video_path.parent.name, leave=False,
                 disable=not progress) as bar:
        for block in stream:
            bar.update()
            if first_block_s is None:
                first_block_s, first_frames = time.perf_counter() - start, block.frames.shape[0]
            writer.write(block.frames)
            keeper.add(block.frames)
    compute = time.perf_counter() - start
    seconds = keeper.seen / fps
    arrival = first_frames / fps  # the first block cannot start before the audio it covers has arrived
    timing = {"ttff_s": arrival + (first_block_s or 0.0), "first_block_compute_s": first_block_s or 0.0,
              "fps": keeper.seen / compute, "rtf": compute / seconds, "video_s": seconds, "compute_s": compute}
    frames, windows = keeper.result()
    return StreamedCase(frames, timing, windows, keeper.seen)


def fid_features(out: Path, records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """The generated and the ground-truth frames' Inception features ``[N, 2048]`` over every case that has them."""
    files = [out / "cases" / r["id"] / r["inception"] for r in records if r.get("inception")]
    if not files:
        return None
    loaded = [np.load(f) for f in files]
    return np.concatenate([f["generated"] for f in loaded]), np.concatenate([f["truth"] for f in loaded])


def run_case(pipe, scorer: Scorer | None, case: Case, folder: Path, windows, cfg: DictConfig) -> dict | None:
    """Stream, write and score one case; returns (and writes, last) its ``scores.json`` record (None on a TPP
    rank that does not output: it streams its part only)."""
    loop = float(cfg.toy_long.loop_seconds) if case.toy_seed is not None and case.loop_audio else None
    inputs = case_inputs(case, tuple(pipe.components.resolution), pipe.fps, loop)
    if scorer is not None:
        folder.mkdir(parents=True, exist_ok=True)
    keep = None
    total = frames_in(len(inputs.wav), pipe.fps)
    height, width = pipe.components.resolution
    if total * 3 * height * width > float(cfg.keep_whole_gb) * 2**30:  # too long to hold: score the windows only
        keep = {name: frames for name, frames, _ in window_slices(total, pipe.fps, windows)}
    shown = scorer is not None and cfg.get("progress", True)  # the output rank, unless progress=false
    streamed = stream_case(pipe, inputs.image, inputs.wav, case.prompt, int(cfg.seed), folder / "video.mp4", keep,
                           inputs.listen_wav, inputs.speaking, progress=shown)
    if streamed is None:
        return None
    reference = inputs.image if isinstance(inputs.image, torch.Tensor) else \
        media.read_image(inputs.image, tuple(pipe.components.resolution))
    scores = score_case(scorer, streamed.frames, reference, inputs.wav, pipe.fps, inputs.truth,
                        case.toy_seed is not None, windows, streamed.windows, streamed.total_frames)
    record = {"id": case.id, "tags": case.tags, "case": case.to_dict(), **scores, "timing": streamed.timing,
              "frames": streamed.total_frames}
    held = streamed.frames
    if held is None:  # only the windows were held: the set-level features come from them
        record["windows_only"] = True
        held = torch.cat(list(streamed.windows.values()), dim=1) if streamed.windows else None
    if held is not None and scorer.video_features is not None and inputs.truth is not None:
        generated, truth = scorer.video_features([held, inputs.truth])
        record["i3d"] = {"generated": generated.tolist(), "truth": truth.tolist()}
    if held is not None and scorer.frame_features is not None and inputs.truth is not None:
        # [n, 2048] per side: kept beside the scores (too many numbers for the JSON record)
        np.savez(folder / FID_FEATURES, generated=scorer.frame_features(held).numpy(),
                 truth=scorer.frame_features(inputs.truth).numpy())
        record["inception"] = FID_FEATURES
    if case.toy_seed is not None and streamed.frames is not None:
        record["identity_curve"] = thin(np.asarray(identity_error(streamed.frames, reference)))
    if case.conversation and streamed.frames is not None:  # toy: talking and listening, read back from the pixels
        record["whole"].update(interaction_scores(streamed.frames, reference, inputs.wav, inputs.listen_wav,
                                                  inputs.speaking, SAMPLE_RATE, pipe.fps).to_dict())
    atomic.write_json(folder / "scores.json", record)
    return record


def run_genbench(cfg: DictConfig, pipe: LiveAvatarPipeline | None = None) -> dict | None:
    """Run the benchmark ``cfg`` describes (``conf/genbench.yaml``); returns the aggregated results (None on the
    ranks of a TPP group that do not output). ``engine=tpp`` runs under torchrun, every rank taking every case."""
    from .genbench_report import aggregate, write_reports

    try:
        suite, cases, default_windows = suite_cases(cfg)
        windows = parse_windows(cfg.windows if cfg.get("windows") is not None else default_windows)
    except (SuiteError, ValueError) as err:
        raise GenBenchError(str(err)) from err
    if cfg.get("cases"):
        cases = cases[: int(cfg.cases)]
    out = Path(cfg.out)
    group = None
    if cfg.engine.name == "tpp":
        from ..tpp_pipeline import TPPPipeline

        pipe = group = TPPPipeline(cfg)
    pipe = pipe or LiveAvatarPipeline.from_config(cfg)
    output = group is None or group.is_output
    scorer = build_scorer(cfg) if output else None
    if output:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    try:
        for case in tqdm(cases, unit="case", desc=f"genbench {suite}",
                         disable=not (output and cfg.get("progress", True))):
            folder = out / "cases" / case.id
            done = folder / "scores.json"
            if _all_agree(group, done.exists()):
                if output:
                    records.append(json.loads(done.read_text()))
                continue
            try:
                record = run_case(pipe, scorer, case, folder, windows, cfg)
            except GroupFailure:  # a rank of the TPP group failed: every rank stops
                raise
            except (UserError, SuiteError, media.MediaError, ValueError, RuntimeError, OSError) as err:
                line = str(err).splitlines()[0] if str(err) else type(err).__name__
                if output:
                    print(f"error: case {case.id}: {line}", file=sys.stderr)
                failed.append({"id": case.id, "error": line})
                continue
            if record is not None:
                records.append(record)
    finally:
        if group is not None:
            group.close()
    if not output:
        return None
    settings = {"checkpoint": cfg.checkpoint, "bench": str(cfg.bench), "engine": cfg.engine.name,
                "model": cfg.model.name, "steps": len(cfg.denoise.steps),
                "overrides": list(cfg.get("label_overrides") or []),
                "engine_settings": OmegaConf.to_container(cfg.engine, resolve=True),
                "rope": OmegaConf.to_container(cfg.model.get("rope") or {}, resolve=True)}
    results = aggregate(suite, records, failed, settings, fid_features(out, records))
    write_reports(results, out)
    return results


def _all_agree(group, value: bool) -> bool:
    """``value`` as the output rank of a TPP group sees it (its files decide which cases are done); ``value``
    itself in one process."""
    if group is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=group.layout.output_rank)
    return bool(box[0])
