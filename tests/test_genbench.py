"""GenBench (``eval/genbench.py``): manifests and their one-line errors, windows, the toy suite scored exactly as the
toy metrics score it, resuming, one failed case not stopping the run, reports, and a ``-m`` sweep ending in one
comparison table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from liveavatar import media
from liveavatar.components import SAMPLE_RATE
from liveavatar.data import toy
from liveavatar.evaluation.genbench import run_genbench
from liveavatar.evaluation import genbench_report
from liveavatar.evaluation.genbench_report import CompareError, compare_runs
from liveavatar.evaluation.scoring import parse_windows, window_slices
from liveavatar.evaluation.suites import SuiteError, load_manifest, looped, manifest_from_folder
from liveavatar.metrics.toy import score_video

from conftest import randomise, tiny_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny toy-preset model with random non-zero weights (a fresh model's zero head makes noise only)."""
    from liveavatar.models import AvatarDiT

    folder = tmp_path_factory.mktemp("genbench") / "ckpt"
    torch.manual_seed(0)
    randomise(AvatarDiT(tiny_preset()), std=0.05, seed=3).save_pretrained(folder)
    return folder


def genbench_cfg(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("genbench", overrides=["progress=false", "denoise.shift=1.0", *overrides])


def test_manifests_load_relative_paths_and_refuse_bad_cases_in_one_line(tmp_path):
    media.write_image(tmp_path / "a.png", torch.zeros(3, 32, 32))
    media.write_wav(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32))
    (tmp_path / "a.txt").write_text("a calm speaker\n")
    cases = manifest_from_folder(tmp_path, tmp_path / "suite.jsonl", seconds=3.0, loop_audio=True)
    assert [c.id for c in cases] == ["a"] and cases[0].prompt == "a calm speaker"
    loaded = load_manifest(tmp_path / "suite.jsonl")
    assert Path(loaded[0].image) == tmp_path / "a.png" and loaded[0].loop_audio and loaded[0].seconds == 3.0
    (tmp_path / "bad.yaml").write_text("cases:\n  - {id: x, image: a.png, audio: missing.wav}\n")
    with pytest.raises(SuiteError, match="audio .*missing.wav not found"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "dup.yaml").write_text("- {id: x, image: a.png, audio: a.wav}\n- {id: x, image: a.png, audio: a.wav}\n")
    with pytest.raises(SuiteError, match="unique"):
        load_manifest(tmp_path / "dup.yaml")
    (tmp_path / "keys.yaml").write_text("- {id: x, image: a.png, audio: a.wav, colour: red}\n")
    with pytest.raises(SuiteError, match="unknown keys"):
        load_manifest(tmp_path / "keys.yaml")


def test_windows_slice_frames_and_audio_together():
    assert parse_windows([[0, 10], [100, 110]]) == [(0.0, 10.0), (100.0, 110.0)]
    with pytest.raises(ValueError, match="start < end"):
        parse_windows([[5, 5]])
    slices = window_slices(frames=250, fps=25.0, windows=[(0, 2), (4, 6), (9, 20), (20, 30)])
    assert [n for n, _, _ in slices] == ["0-2s", "4-6s", "9-20s"]   # the last starts past the end
    name, frames, samples = slices[1]
    assert (frames.start, frames.stop) == (100, 150) and (samples.start, samples.stop) == (64000, 96000)
    assert slices[2][1] == slice(225, 250)
    assert looped(np.arange(3.0), 7).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_the_toy_suite_scores_what_the_toy_metrics_give_and_resumes(tmp_path, checkpoint):
    out = tmp_path / "run"
    cfg = genbench_cfg(f"checkpoint={checkpoint}", "bench=toy", "toy.clips=2", "toy.seconds=1.0", f"out={out}")
    results = run_genbench(cfg)
    assert results["cases"] == 2 and not results["failed"]
    # Independent: read the written video back and score it with the toy metrics directly.
    record = json.loads((out / "cases" / "toy_987654321" / "scores.json").read_text())
    clip = toy.make_clip(987654321, 25, size=(32, 32), fps=25.0, sample_rate=SAMPLE_RATE)
    frames, _ = media.read_video(out / "cases" / "toy_987654321" / "video.mp4")
    direct = score_video(frames.transpose(0, 1), clip.reference, clip.wav, SAMPLE_RATE, 25.0)
    assert record["whole"]["identity_error"] == pytest.approx(direct.identity_error, rel=0.1)  # H.264 vs exact
    assert record["frames"] == 25 and record["timing"]["rtf"] > 0 and record["timing"]["ttff_s"] > 0.04
    # The toy case has ground truth: PSNR/SSIM against it, beside the weight-free metrics every case gets.
    assert {"psnr", "ssim", "flicker", "colour_drift", "histogram_drift", "sharpness"} <= set(record["whole"])
    assert 0 < record["whole"]["flicker"] <= 1 and -1 <= record["whole"]["ssim"] <= 1
    assert results["whole"]["identity_error"] == pytest.approx(
        np.mean([json.loads(p.read_text())["whole"]["identity_error"] for p in (out / "cases").glob("*/scores.json")]))
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "toy_987654322" in html
    assert "identity_error" in (out / "report.md").read_text()
    # Resume: a finished case is not streamed again.
    stamp = (out / "cases" / "toy_987654321" / "video.mp4").stat().st_mtime_ns
    run_genbench(cfg)
    assert (out / "cases" / "toy_987654321" / "video.mp4").stat().st_mtime_ns == stamp


def test_a_failing_case_is_one_line_and_the_run_goes_on(tmp_path, checkpoint, capsys):
    media.write_image(tmp_path / "good.png", torch.zeros(3, 32, 32))
    media.write_wav(tmp_path / "good.wav", (0.1 * np.sin(np.arange(8000) / 9.0)).astype(np.float32))
    media.write_image(tmp_path / "short.png", torch.zeros(3, 32, 32))
    media.write_wav(tmp_path / "short.wav", np.zeros(100, dtype=np.float32))  # shorter than one frame
    manifest = tmp_path / "suite.yaml"
    manifest.write_text("cases:\n  - {id: good, image: good.png, audio: good.wav, tags: {view: front}}\n"
                        "  - {id: short, image: short.png, audio: short.wav}\n")
    results = run_genbench(genbench_cfg(f"checkpoint={checkpoint}", f"bench={manifest}", f"out={tmp_path / 'o'}",
                                        "windows=[[0,0.2],[0.2,0.4]]"))
    assert results["cases"] == 1 and [f["id"] for f in results["failed"]] == ["short"]
    err = capsys.readouterr().err
    assert "error: case short:" in err and "Traceback" not in err
    assert set(results["windows"]) == {"0-0.2s", "0.2-0.4s"} and "view=front" in results["tags"]
    assert 0 < results["whole"]["flicker"] <= 1.0 and "psnr" not in results["whole"]   # no ground truth here


@pytest.mark.slow
def test_a_sweep_ends_with_one_comparison_table(tmp_path):
    """Position policies only differ with a sink (RoPE is relative): a sink-token model, streamed past the window."""
    from liveavatar.models import AvatarDiT

    config = tiny_preset()
    config.reference = "sink"
    torch.manual_seed(0)
    randomise(AvatarDiT(config), std=0.05, seed=4).save_pretrained(tmp_path / "sink_ckpt")
    out = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "genbench.py"), "-m", f"checkpoint={tmp_path / 'sink_ckpt'}",
         "bench=toy", "toy.clips=1", "toy.seconds=2.0", "denoise.shift=1.0", "model.dit.reference=sink",
         "engine.sink=reference", "model.rope.policy=absolute,rapr", "model.window_blocks=1",
         "model.rope.max_distance=4", f"out={out}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["rows"]) == {"model.rope.policy=absolute", "model.rope.policy=rapr"}
    a, b = comparison["rows"].values()
    assert a["identity_error"] != b["identity_error"]   # the policies stream differently past the window
    assert "data:image/png;base64," in (out / "comparison.html").read_text()
    assert "GenBench comparison of 2 runs" in result.stdout


def test_compare_runs_marks_the_best_value_per_column(tmp_path):
    for name, err, rtf, drift in (("a", 0.2, 0.5, 0.01), ("b", 0.1, 0.4, -0.03)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "settings": {"overrides": ["x=1", f"sink={name}"]},
            "whole": {"identity_error": err, "lip_sync": err, "identity_drift": drift},
            "timing": {"rtf": rtf}, "windows": {}}))
    table = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path)
    # Columns sorted (identity_drift, identity_error, lip_sync, rtf); rows named by the override that differs;
    # lower identity error and real-time factor are better, higher lip sync is, and the drift closest to zero.
    assert "| sink=a | 1 | **0.01** | 0.2 | **0.2** | 0.5 |" in table
    assert "| sink=b | 1 | -0.03 | **0.1** | 0.1 | **0.4** |" in table


def training_run(root: Path, folder: str, seed: int, **changes) -> Path:
    """A fake finished training run: ``<root>/<folder>/config.yaml`` (a small resolved config with ``seed`` and
    the keys that differ between seeds of one setting) and an empty ``model`` folder, whose path is returned."""
    config = {"name": folder, "seed": seed, "stage": "diffusion_forcing", "progress": False,
              "init_from": f"teachers/seed{seed}/model",
              "run": {"dir": str(root / folder), "resume": True, "overwrite": False},
              "model": {"dim": 64, "rope": {"policy": "rolling"}}, "optim": {"lr": 0.001}}
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    (root / folder / "model").mkdir(parents=True)
    (root / folder / "config.yaml").write_text(yaml.safe_dump(config))
    return root / folder / "model"


def genbench_run(folder: Path, checkpoint: Path, whole: dict, overrides=("bench=toy",), last_window=None) -> Path:
    """A fake GenBench run folder: ``results.json`` as ``aggregate`` lays it out (only what a comparison reads)."""
    folder.mkdir(parents=True)
    windows = {"0-2s": {}, "2-4s": last_window} if last_window else {}
    (folder / "results.json").write_text(json.dumps({
        "settings": {"checkpoint": str(checkpoint), "overrides": [*overrides, f"checkpoint={checkpoint}"]},
        "whole": whole, "set": {}, "timing": {"rtf": 0.5}, "windows": windows}))
    return folder


def table_cells(table: str, row: str) -> dict[str, str]:
    """The cells of one row of a markdown table, by column."""
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row:
            return dict(zip(header[1:], cells[1:]))
    raise AssertionError(f"no row {row!r} in\n{table}")


# Per training run: identity error (lower is better) and lip sync (higher is better). Setting A (3 seeds) has the
# best identity error and setting B (3 seeds, another RoPE policy) is further from it than both spreads together;
# B has the best lip sync and A is closer to it than both spreads together though further than either alone.
# Setting C (another learning rate) has one seed.
SEED_SCORES = {"a": [(0.10, 0.50), (0.12, 0.60), (0.11, 0.55)],
               "b": [(0.20, 0.59), (0.22, 0.65), (0.21, 0.62)],
               "c": [(0.90, 0.05)]}


@pytest.fixture
def seeded_runs(tmp_path) -> dict[str, list[Path]]:
    """GenBench run folders of three settings over training seeds (:data:`SEED_SCORES`), by setting."""
    changes = {"a": {}, "b": {"model__rope__policy": "rapr"}, "c": {"optim__lr": 0.01}}
    runs = {}
    for setting, scores in SEED_SCORES.items():
        runs[setting] = []
        for seed, (err, sync) in enumerate(scores):
            ckpt = training_run(tmp_path / "train", f"{setting}_s{seed}", seed, **changes[setting])
            runs[setting].append(genbench_run(tmp_path / "eval" / f"{setting}_s{seed}", ckpt,
                                              {"identity_error": err, "lip_sync": sync},
                                              last_window={"identity_error": 2 * err}))
    return runs


def test_compare_runs_groups_training_seeds_into_mean_and_spread(tmp_path, seeded_runs):
    folders = [f for setting in ("a", "b", "c") for f in seeded_runs[setting]]
    table = compare_runs(folders, tmp_path / "cmp")
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    # Named by the training keys that differ between settings (not by checkpoints: they differ within a setting).
    names = {"a": "train.model.rope.policy=rolling train.optim.lr=0.001",
             "b": "train.model.rope.policy=rapr train.optim.lr=0.001",
             "c": "train.model.rope.policy=rolling train.optim.lr=0.01"}
    assert list(comparison["groups"]) == list(names.values())
    for setting, name in names.items():
        group, values = comparison["groups"][name], np.array(SEED_SCORES[setting])
        assert group["n"] == len(values) and group["members"] == [str(f) for f in seeded_runs[setting]]
        assert group["seeds"] == list(range(len(values)))
        for column, metric in enumerate(("identity_error", "lip_sync")):
            assert group["mean"][metric] == pytest.approx(values[:, column].mean())
            assert comparison["rows"][name][metric] == pytest.approx(values[:, column].mean())  # the old flat means
            if len(values) > 1:
                assert group["std"][metric] == pytest.approx(values[:, column].std(ddof=1))
            else:
                assert group["std"][metric] is None
    last = comparison["last_window_groups"][f"{names['a']} [2-4s]"]
    assert last["n"] == 3 and last["mean"]["identity_error"] == pytest.approx(2 * np.mean([0.10, 0.12, 0.11]))

    a, b, c = (table_cells(table, names[s]) for s in "abc")
    assert a["n"] == "3" and c["n"] == "1"
    err_a, sync_b = np.array(SEED_SCORES["a"])[:, 0], np.array(SEED_SCORES["b"])[:, 1]
    assert a["identity_error"] == f"**{err_a.mean():.4g} ± {err_a.std(ddof=1):.2g}**"
    assert b["lip_sync"] == f"**{sync_b.mean():.4g} ± {sync_b.std(ddof=1):.2g}**"
    # |0.21 - 0.11| = 0.1 > 0.01 + 0.01: beyond the spread. |0.55 - 0.62| = 0.07 < 0.05 + 0.03: within it.
    assert b["identity_error"].endswith(" †") and "†" not in a["lip_sync"]
    # One seed: the value alone, never marked however far off, and said so under the table.
    assert c["identity_error"] == "0.9" and c["lip_sync"] == "0.05"
    assert f"n = 1 ({names['c']}): single seed: no spread" in table
    md, html = (tmp_path / "cmp" / "comparison.md").read_text(), (tmp_path / "cmp" / "comparison.html").read_text()
    assert genbench_report.LEGEND in md and "|mean - best mean| &gt; std + std of the best" in html
    err_b = np.array(SEED_SCORES["b"])[:, 0]
    assert f"<td>{err_b.mean():.4g} ± {err_b.std(ddof=1):.2g} †</td>" in html
    assert "data:image/png;base64," in html and comparison["rule"] == genbench_report.LEGEND


def test_the_spread_rule_needs_a_spread_on_both_sides():
    def stats(values):
        return genbench_report.seed_stats([{"m": v} for v in values])

    wide, narrow, far = stats([0.0, 1.0]), stats([0.4, 0.6]), stats([2.0, 2.2])
    assert genbench_report.beyond_spread(narrow, far, "m") and not genbench_report.beyond_spread(wide, narrow, "m")
    # 0.5 vs 2.1: std 0.707 + 0.141 < 1.6, beyond; a single run has no spread, so nothing is beyond it.
    assert genbench_report.beyond_spread(wide, far, "m")
    assert not genbench_report.beyond_spread(stats([5.0]), far, "m")


def test_compare_runs_groups_by_hand_and_keeps_checkpoints_without_a_config_apart(tmp_path):
    folders = [genbench_run(tmp_path / f"r{i}", tmp_path / f"ckpt{i}" / "model", {"flicker": v})
               for i, v in enumerate((0.9, 0.8, 0.4))]
    # No training config.yaml beside these checkpoints: each run its own row, named by its checkpoint as before.
    table = compare_runs(folders, tmp_path / "apart")
    assert [table_cells(table, f"checkpoint={tmp_path / f'ckpt{i}' / 'model'}")["n"] for i in range(3)] == ["1"] * 3
    compare_runs(folders, tmp_path / "hand", names=["x", "x", "y"])
    groups = json.loads((tmp_path / "hand" / "comparison.json").read_text())["groups"]
    assert list(groups) == ["x", "y"] and groups["x"]["n"] == 2
    assert groups["x"]["std"]["flicker"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    with pytest.raises(CompareError, match="^2 names for 3 run folders"):
        compare_runs(folders, tmp_path / "bad", names=["x", "y"])
    with pytest.raises(CompareError, match="results.json not found"):
        compare_runs([tmp_path / "nowhere"], tmp_path / "bad")


def test_the_comparison_plot_draws_one_std_error_bars_where_there_is_a_spread(monkeypatch):
    figures = []
    monkeypatch.setattr(genbench_report, "_png", lambda fig: figures.append(fig) or "png")
    rows = {"a": {"m": 1.0}, "b": {"m": 2.0}, "c": {"m": 3.0}}
    assert genbench_report.comparison_plot(rows, {"a": {"m": 0.25}, "b": {"m": None}, "c": {"m": 0.5}}) == "png"
    from matplotlib.container import ErrorbarContainer

    (ax,) = figures[0].axes
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = [np.asarray(s)[:, 1] for s in bars.lines[2][0].get_segments()]
    assert [tuple(s) for s in segments] == [(0.75, 1.25), (2.5, 3.5)]   # a and c only: b has one seed


def test_bad_settings_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "eval" / "genbench.py"), f"bench={tmp_path / 'none.yaml'}",
                             f"out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: bench=") and "not found" in result.stderr


def test_fvd_over_the_toy_cases_when_i3d_weights_are_given(tmp_path, checkpoint):
    """Set-level FVD: I3D features of each case's video and its ground truth, one Frechet distance over the cases."""
    from test_metrics_weighted import TinyI3D

    torch.manual_seed(0)
    torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    results = run_genbench(genbench_cfg(f"checkpoint={checkpoint}", "bench=toy", "toy.clips=3", "toy.seconds=0.6",
                                        f"out={tmp_path / 'o'}", f"metrics.i3d={tmp_path / 'i3d.pt'}"))
    assert results["set"]["fvd_clips"] == 3 and results["set"]["fvd"] > 0
    assert "fvd" in (tmp_path / "o" / "report.md").read_text()


def test_fid_over_the_toy_cases_when_inception_weights_are_given(tmp_path, checkpoint):
    """Set-level FID: Inception features of frames of each case's video and of its ground truth, kept beside the
    case's scores, one Frechet distance over all frames; a resumed run reads them back."""
    from liveavatar.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "pt_inception.pth")
    args = [f"checkpoint={checkpoint}", "bench=toy", "toy.clips=2", "toy.seconds=0.6", f"out={tmp_path / 'o'}",
            f"metrics.inception={tmp_path / 'pt_inception.pth'}", "metrics.fid_frames=3"]
    results = run_genbench(genbench_cfg(*args))
    assert results["set"]["fid_frames"] == 6 and results["set"]["fid"] > 0
    features = np.load(tmp_path / "o" / "cases" / results["per_case"][0]["id"] / "inception.npz")
    assert features["generated"].shape == (3, 2048) and features["truth"].shape == (3, 2048)
    again = run_genbench(genbench_cfg(*args))   # every case done: scores and features read back
    assert again["set"]["fid"] == pytest.approx(results["set"]["fid"])
    assert "fid" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.distributed
def test_tpp_scores_what_the_sequential_engine_scores_and_resumes(tmp_path, checkpoint):
    """engine=tpp under torchrun (2 DiT ranks + the decoding rank, every rank taking every case): the same videos
    and scores as the sequential engine in one process; a second run skips the finished cases on every rank."""
    common = [f"checkpoint={checkpoint}", "bench=toy", "toy.clips=2", "toy.seconds=0.6", "denoise.steps=[1000,500]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each TPP rank runs: CPU kernels split reductions by thread count
    try:
        expected = run_genbench(genbench_cfg(*common, f"out={tmp_path / 'seq'}"))
    finally:
        torch.set_num_threads(threads)

    def tpp():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                               str(ROOT / "eval" / "genbench.py"), *common, "engine=tpp", "engine.timeout_s=60",
                               "progress=false", "denoise.shift=1.0", f"out={tmp_path / 'tpp'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    first = tpp()
    assert first.returncode == 0, first.stderr[-3000:]
    got = json.loads((tmp_path / "tpp" / "results.json").read_text())
    assert got["cases"] == 2 and got["settings"]["engine"] == "tpp"
    for mine, theirs in zip(got["per_case"], expected["per_case"]):
        assert mine["id"] == theirs["id"]
        for key in ("lip_sync", "identity_error", "psnr", "ssim", "flicker"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
    assert got["timing"]["ttff_s"] > 0 and got["timing"]["rtf"] > 0
    stamp = (tmp_path / "tpp" / "cases" / "toy_987654321" / "video.mp4").stat().st_mtime_ns
    again = tpp()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "tpp" / "cases" / "toy_987654321" / "video.mp4").stat().st_mtime_ns == stamp


def test_a_case_too_long_to_hold_is_scored_over_its_windows_alone(tmp_path, checkpoint):
    """Above keep_whole_gb only the windows' frames are held: the windows score exactly as when every frame is
    held, the whole-video scores are left out, and the video is still written whole."""
    common = [f"checkpoint={checkpoint}", "bench=toy_long", "toy_long.clips=1", "toy_long.seconds=3",
              "toy_long.loop_seconds=1", "windows=[[0,1],[2,3]]"]
    held = run_genbench(genbench_cfg(*common, f"out={tmp_path / 'all'}"))
    windows = run_genbench(genbench_cfg(*common, f"out={tmp_path / 'win'}", "keep_whole_gb=1e-6"))
    assert held["windows"].keys() == windows["windows"].keys() == {"0-1s", "2-3s"}
    for name in held["windows"]:
        assert windows["windows"][name] == pytest.approx(held["windows"][name], rel=1e-12)
    assert "identity_error" in held["whole"] and "identity_error" not in windows["whole"]
    record = json.loads(next((tmp_path / "win" / "cases").glob("*/scores.json")).read_text())
    assert record["windows_only"] and record["frames"] == 75 and "identity_curve" not in record
    frames, _ = media.read_video(next((tmp_path / "win" / "cases").glob("*/video.mp4")))
    assert frames.shape[0] == 75
    assert (tmp_path / "win" / "report.html").is_file()


def test_the_identity_over_time_figure_averages_cases_then_seeds(tmp_path):
    def with_curves(folder, curves, seconds):
        results = json.loads((folder / "results.json").read_text())
        results["curves"], results["video_seconds"] = curves, seconds
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    # Two cases of different lengths and point counts: resampled onto the shorter one's 0..4 s, then averaged.
    run = with_curves(genbench_run(tmp_path / "r0", tmp_path / "c0" / "model", {"flicker": 0.1}),
                      {"a": [0.0, 1.0, 2.0], "b": [1.0, 1.0, 1.0, 1.0, 1.0]}, {"a": 4.0, "b": 8.0})
    seconds, error = genbench_report.mean_identity_curve(json.loads((run / "results.json").read_text()), points=5)
    np.testing.assert_allclose(seconds, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(error, (np.array([0, 0.5, 1, 1.5, 2]) + 1) / 2)
    flat = with_curves(genbench_run(tmp_path / "r1", tmp_path / "c1" / "model", {"flicker": 0.2}),
                       {"a": [0.5, 0.5]}, {"a": 4.0})
    compare_runs([run, flat], tmp_path / "cmp", names=["drifting", "flat"])
    png = (tmp_path / "cmp" / "identity_over_time.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert "Identity error over time" in (tmp_path / "cmp" / "comparison.html").read_text()
    # Runs without curves (not a toy suite) get no such figure.
    compare_runs([genbench_run(tmp_path / "r2", tmp_path / "c2" / "model", {"flicker": 0.3})], tmp_path / "none")
    assert not (tmp_path / "none" / "identity_over_time.png").exists()


def test_sweep_job_folders_are_flat_and_short_whatever_the_overrides():
    from liveavatar.cli import MAX_DIRNAME, sweep_dirname

    assert sweep_dirname("checkpoint=outputs/train/a/model,engine.sink=aas") == \
        "checkpoint=outputs_train_a_model,engine.sink=aas"
    long_a = "checkpoint=/x/model," + ",".join(f"key{i}=value{i}" for i in range(40))
    long_b = long_a.replace("value39", "other39")   # differs only past the cut
    a, b = sweep_dirname(long_a), sweep_dirname(long_b)
    assert len(a) == MAX_DIRNAME and "/" not in a and a != b and a[:80] == b[:80]
