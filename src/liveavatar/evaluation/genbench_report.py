"""GenBench's reports: one run's aggregate (``results.json``, ``report.md``, ``report.html``) and the comparison of
several runs (a Hydra ``-m`` sweep, or folders given by hand) as one ablation table.

The HTML is self-contained (plots embedded as PNG data URIs), so it can be mailed or attached to an issue.
Plots: metrics per time window (long runs), the identity error over time of each toy case, and, for a comparison,
one bar chart per metric across settings (with the seed-to-seed standard deviation as error bars).

Comparisons are over training seeds. Runs are one setting (one row) when their GenBench overrides are equal but for
``checkpoint=`` and their checkpoints' training configs (``<run folder>/config.yaml`` beside ``<run folder>/model``)
are equal but for ``seed``, ``name``, ``run.*``, ``init_from`` / ``generator_from`` / ``teacher_from``,
``progress`` and output paths (:data:`SEED_FREE_KEYS`, :data:`OUTPUT_KEYS`). A checkpoint without a readable
training config is a setting of its own. ``compare_runs(..., names=[...])`` groups by hand instead: equal names,
one setting. A row gives, per metric, the mean over its runs, the standard deviation (ddof=1) and n.

The rule the table marks: the best mean of each column is bold; a row is marked † in a column when
``|mean - best mean| > std + std of the best row``, i.e. the two means are further apart than the seed-to-seed
spread of both together; both rows need n >= 2 for that metric, otherwise there is no spread and no mark. This is a
rough screen (no test, no correction for many columns), not a significance claim.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .. import atomic
from ..training.run_folder import flatten_config

TIMING = ("ttff_s", "fps", "rtf")
# Lower is better for these, closest to zero for the signed trends and offsets (the rest: higher is better); marks
# the best value of a comparison column.
LOWER_IS_BETTER = {"identity_error", "colour_drift", "histogram_drift", "ttff_s", "rtf", "sync_d", "fid", "fvd"}
CLOSEST_TO_ZERO = {"identity_drift", "colour_trend", "dino_s_trend", "sync_offset"}


def _mean(rows: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def aggregate(suite: str, records: list[dict], failed: list[dict], settings: dict,
              fid_features: tuple | None = None) -> dict:
    """Means over cases: whole video, per window, per tag, timing; the set-level FVD (from the records' I3D
    features) and FID (from ``fid_features``: generated and ground-truth frames' Inception features)."""
    windows: dict[str, list[dict]] = {}
    tags: dict[str, list[dict]] = {}
    for r in records:
        for name, scores in r["windows"].items():
            windows.setdefault(name, []).append(scores)
        for key, value in r["tags"].items():
            tags.setdefault(f"{key}={value}", []).append(r["whole"])
    order = sorted(windows, key=lambda n: float(n.split("-")[0]))
    pairs = [r["i3d"] for r in records if "i3d" in r]
    set_level = {}
    if len(pairs) >= 2:  # a covariance needs at least two clips per side (and many more to mean much)
        from ..metrics.frechet import frechet_from_features

        set_level = {"fvd": frechet_from_features([p["generated"] for p in pairs], [p["truth"] for p in pairs]),
                     "fvd_clips": len(pairs)}
    if fid_features is not None and min(len(fid_features[0]), len(fid_features[1])) >= 2:
        from ..metrics.frechet import frechet_from_features

        set_level.update(fid=frechet_from_features(*fid_features), fid_frames=len(fid_features[0]))
    return {
        "suite": suite, "settings": settings, "cases": len(records), "failed": failed,
        "whole": _mean([r["whole"] for r in records]) if records else {},
        "set": set_level,
        "timing": _mean([r["timing"] for r in records]) if records else {},
        "windows": {n: _mean(windows[n]) for n in order},
        "tags": {k: _mean(v) for k, v in sorted(tags.items())},
        "per_case": [{"id": r["id"], "tags": r["tags"], **r["whole"], **{k: r["timing"][k] for k in TIMING}}
                     for r in records],
        "curves": {r["id"]: r["identity_curve"] for r in records if "identity_curve" in r},
        "video_seconds": {r["id"]: r["timing"]["video_s"] for r in records},
    }


# ----------------------------------------------------------------------------- seeds: runs grouped into settings
# Training-config keys that may differ between the seeds of one setting: the seed, the run's name and folder, the
# checkpoints it started from (each seed of a Stage 1 run may start from its own teacher) and its progress bar.
SEED_FREE_KEYS = ("seed", "name", "run", "init_from", "generator_from", "teacher_from", "progress")
# Output paths, wherever they sit in the config (the last part of a dotted key).
OUTPUT_KEYS = ("out", "out_dir", "output_dir", "save_dir", "log_dir")
LEGEND = ("bold: the best mean of the column; †: further from the best mean than the seed-to-seed spread, "
          "|mean - best mean| > std + std of the best (std over training seeds, ddof=1; both rows need n >= 2).")


class CompareError(ValueError):
    """A comparison cannot be made as asked (one line for the user)."""


@dataclass
class Run:
    """One GenBench run of a comparison: its folder, its ``results.json``, its GenBench overrides (``key=value``
    strings) and the flattened training config of its checkpoint (dotted key -> value; None: none readable)."""

    folder: Path
    results: dict
    overrides: list[str]
    training: dict | None


def training_config(checkpoint: str | None) -> dict | None:
    """The flattened training config (dotted key -> value) of the run that wrote ``checkpoint``: the
    ``config.yaml`` beside it (``<run folder>/model`` -> ``<run folder>/config.yaml``, as ``train.py`` and
    ``distill.py`` lay a run out). None when there is none or it is not a YAML mapping. A relative path is read from
    the working directory, as GenBench read the checkpoint."""
    if not checkpoint:
        return None
    path = Path(checkpoint).parent / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return flatten_config(config) if isinstance(config, dict) else None


def seed_free(key: str) -> bool:
    """Whether a dotted training-config key may differ between the seeds of one setting."""
    parts = key.split(".")
    return parts[0] in SEED_FREE_KEYS or parts[-1] in OUTPUT_KEYS


def _setting_training(training: dict) -> dict:
    """A training config without its seed-free keys: what it says about the trained model."""
    return {k: v for k, v in training.items() if not seed_free(k)}


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _setting_overrides(run: Run) -> list[str]:
    """A run's GenBench overrides that make its setting: all of them, but ``checkpoint=`` when the checkpoint's
    training config stands for it (the seeds of one setting are different checkpoints)."""
    if run.training is None:
        return list(run.overrides)
    return [o for o in run.overrides if _key_of(o) != "checkpoint"]


def group_runs(runs: list[Run], names: list[str] | None = None) -> list[list[int]]:
    """The runs (indices) grouped into settings, in order of first appearance: by ``names`` when given (equal
    names, one setting); else runs with equal overrides but for ``checkpoint=`` and equal training configs but for
    the seed-free keys; a run whose checkpoint has no training config is a setting of its own."""
    groups: dict[object, list[int]] = {}
    for i, run in enumerate(runs):
        if names is not None:
            key = ("named", str(names[i]))
        elif run.training is None:
            key = ("alone", i)
        else:
            key = ("trained", tuple(sorted(_setting_overrides(run))),
                   json.dumps(_setting_training(run.training), sort_keys=True, default=str))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def group_names(runs: list[Run], groups: list[list[int]]) -> list[str]:
    """Each setting named by what sets it apart from the others: its overrides (as :func:`_setting_overrides`)
    and the training-config keys it differs in (``train.<key>=value``; more than three: its first checkpoint
    instead, the configs being of different kinds of run); nothing apart: its first folder's name. A repeated
    name gets a count."""
    overrides = [set(_setting_overrides(runs[g[0]])) for g in groups]
    trained = [{f"{k}={_shown(v)}" for k, v in _setting_training(runs[g[0]].training or {}).items()} for g in groups]
    shared_overrides, shared_training = set.intersection(*overrides), set.intersection(*trained)
    names, seen = [], {}
    for g, own, train in zip(groups, overrides, trained):
        first = runs[g[0]]
        label = [o for o in first.overrides if o in own - shared_overrides]  # in the command's order
        train = sorted(train - shared_training)
        if len(train) > 3:
            more = f" +{len(g) - 1} more" if len(g) > 1 else ""
            label.append(f"checkpoint={(first.results.get('settings') or {}).get('checkpoint')}{more}")
        else:
            label += [f"train.{t}" for t in train]
        name = " ".join(label) or first.folder.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def seed_stats(rows: list[dict[str, float]]) -> dict:
    """Per metric over the runs of one setting (``rows``: metric -> value, one dict per run): ``mean``, ``std``
    (ddof=1; None with one value: no spread) and ``counts`` (runs that have the metric); ``n``: the runs."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for metric, value in row.items():
            values.setdefault(metric, []).append(value)
    metrics = sorted(values)
    return {"mean": {m: float(np.mean(values[m])) for m in metrics},
            "std": {m: float(np.std(values[m], ddof=1)) if len(values[m]) >= 2 else None for m in metrics},
            "n": len(rows), "counts": {m: len(values[m]) for m in metrics}}


def beyond_spread(a: dict, b: dict, metric: str) -> bool:
    """Whether two settings' means of ``metric`` (:func:`seed_stats` dicts) are further apart than their
    seed-to-seed spread, |mean_a - mean_b| > std_a + std_b; False unless both have a spread (n >= 2)."""
    spread_a, spread_b = a["std"].get(metric), b["std"].get(metric)
    if spread_a is None or spread_b is None:
        return False
    return abs(a["mean"][metric] - b["mean"][metric]) > spread_a + spread_b


# ----------------------------------------------------------------------------------------------- tables
def best_of(values: dict[str, float], column: str) -> str:
    """The name whose value is best in ``column`` (``values``: row name -> value; the first one on a tie)."""
    if column in CLOSEST_TO_ZERO:
        return min(values, key=lambda n: abs(values[n]))
    return (min if column in LOWER_IS_BETTER else max)(values, key=values.get)


def md_table(rows: dict[str, dict[str, float]], columns: list[str] | None = None, best: bool = False) -> str:
    """A markdown table, one row per key; ``best``: the best value of each column in bold."""
    if not rows:
        return "(none)\n"
    columns = columns or sorted({k for r in rows.values() for k in r})
    marks = {}
    if best and len(rows) > 1:
        for c in columns:
            values = {n: r[c] for n, r in rows.items() if c in r}
            if values:
                marks[c] = best_of(values, c)
    lines = ["| | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, r in rows.items():
        cells = []
        for c in columns:
            text = f"{r[c]:.4g}" if c in r else "-"
            cells.append(f"**{text}**" if marks.get(c) == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _html_table(markdown: str) -> str:
    lines = [l for l in markdown.strip().splitlines() if not l.startswith("| ---")]
    out = ["<table>"]
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        tag = "th" if i == 0 else "td"
        row = "".join(f"<{tag}>{'<b>' + html.escape(c[2:-2]) + '</b>' if c.startswith('**') else html.escape(c)}</{tag}>"
                      for c in cells)
        out.append(f"<tr>{row}</tr>")
    return "\n".join(out + ["</table>"])


def _seed_cell(stats: dict, column: str, best: bool, marked: bool) -> str:
    """One cell of a settings table: ``mean ± std`` (the mean alone without a spread), ``(n=k)`` when only k of
    the row's runs have the metric, bold when best, † when beyond the spread of the best."""
    if column not in stats["mean"]:
        return "-"
    text = f"{stats['mean'][column]:.4g}"
    if stats["std"][column] is not None:
        text += f" ± {stats['std'][column]:.2g}"
    if stats["counts"][column] != stats["n"]:
        text += f" (n={stats['counts'][column]})"
    if best:
        return f"**{text}**"
    return f"{text} †" if marked else text


def seed_table(groups: dict[str, dict], columns: list[str] | None = None) -> str:
    """The markdown table of settings (``groups``: row name -> :func:`seed_stats`), one ``n`` column and one
    column per metric: the best mean of each column bold, † on the rows :func:`beyond_spread` of the best."""
    if not groups:
        return "(none)\n"
    columns = columns or sorted({k for g in groups.values() for k in g["mean"]})
    best = {}
    if len(groups) > 1:
        for c in columns:
            means = {name: g["mean"][c] for name, g in groups.items() if c in g["mean"]}
            if means:
                best[c] = best_of(means, c)
    lines = ["| | n | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for name, g in groups.items():
        cells = [_seed_cell(g, c, best.get(c) == name,
                            c in best and best[c] != name and beyond_spread(g, groups[best[c]], c)) for c in columns]
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _repeats_a_seed(seeds: list) -> bool:
    """Whether a known training seed (None: unknown) appears twice."""
    known = [json.dumps(seed) for seed in seeds if seed is not None]
    return len(set(known)) < len(known)


def seed_notes(groups: dict[str, dict]) -> list[str]:
    """The lines under a settings table: the legend, which rows have one seed only and which repeat a seed."""
    notes = [LEGEND]
    single = [name for name, g in groups.items() if g["n"] == 1]
    if single:
        notes.append(f"n = 1 ({', '.join(single)}): single seed: no spread, so never marked †.")
    # Two evaluations of one training seed spread by GenBench's own noise only, not by the seed's.
    repeated = [name for name, g in groups.items() if _repeats_a_seed(g.get("seeds", []))]
    if repeated:
        notes.append(f"{', '.join(repeated)}: some runs share a training seed, so the spread is not only "
                     "seed-to-seed.")
    return notes


# ------------------------------------------------------------------------------------------------ plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def run_plots(results: dict) -> dict[str, str]:
    """Base64 PNGs: metrics over windows; identity error over time per toy case."""
    plt, plots = _pyplot(), {}
    if plt is None:
        return plots
    windows = results["windows"]
    metrics = sorted({k for w in windows.values() for k in w})
    if windows and metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            ax.plot(range(len(windows)), [w.get(m, np.nan) for w in windows.values()], marker="o")
            ax.set_xticks(range(len(windows)), list(windows), rotation=30, fontsize=7)
            ax.set_title(m, fontsize=9)
            ax.grid(alpha=0.3)
        fig.suptitle("metrics per time window (mean over cases)", fontsize=10)
        fig.tight_layout()
        plots["windows"] = _png(fig)
    if results["curves"]:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for case, curve in results["curves"].items():
            ax.plot(np.linspace(0, results["video_seconds"][case], len(curve)), curve, lw=1, label=case)
        ax.set_xlabel("seconds")
        ax.set_ylabel("identity error")
        ax.set_title("identity error over each toy case")
        ax.grid(alpha=0.3)
        if len(results["curves"]) <= 8:
            ax.legend(fontsize=7)
        fig.tight_layout()
        plots["identity"] = _png(fig)
    return plots


def comparison_plot(rows: dict[str, dict[str, float]],
                    spread: dict[str, dict[str, float | None]] | None = None) -> str | None:
    """One bar chart per metric across settings (``rows``: row name -> metric -> mean), as a base64 PNG;
    ``spread`` (row name -> metric -> std, None without one) draws error bars of one std where a row has one."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    metrics = sorted({k for r in rows.values() for k in r})
    if not metrics:
        return None
    spread = spread or {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.bar(range(len(rows)), [r.get(m, np.nan) for r in rows.values()])
        bars = [(i, r[m], spread[name][m]) for i, (name, r) in enumerate(rows.items())
                if m in r and spread.get(name, {}).get(m) is not None]
        if bars:
            x, y, err = zip(*bars)
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor="black", capsize=3)
        ax.set_xticks(range(len(rows)), list(rows), rotation=60, fontsize=6)
        ax.set_title(m, fontsize=9)
    return _png(fig)


def mean_identity_curve(results: dict, points: int = 200) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's identity error over time, averaged over its toy cases: ``(seconds [points], error [points])``, each
    case's curve resampled onto the shortest case's duration. None without curves."""
    curves = results.get("curves") or {}
    if not curves:
        return None
    seconds = min(results["video_seconds"][case] for case in curves)
    grid = np.linspace(0.0, seconds, points)
    resampled = [np.interp(grid, np.linspace(0.0, results["video_seconds"][case], len(curve)), curve)
                 for case, curve in curves.items()]
    return grid, np.mean(resampled, axis=0)


def identity_over_time_plot(runs: list[Run], groups: list[list[int]], labels: list[str]) -> bytes | None:
    """PNG bytes: each setting's identity error over time (mean over cases, then over its seeds, with a band of
    one seed-to-seed std where it has several). None when no run has curves (not a toy suite)."""
    plt = _pyplot()
    if plt is None:
        return None
    lines = []
    for label, members in zip(labels, groups):
        per_run = [c for c in (mean_identity_curve(runs[i].results) for i in members) if c is not None]
        if per_run:
            seconds = min(c[0][-1] for c in per_run)
            grid = np.linspace(0.0, seconds, len(per_run[0][0]))
            values = np.stack([np.interp(grid, t, v) for t, v in per_run])
            lines.append((label, grid, values))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, grid, values in lines:
        mean = values.mean(axis=0)
        ax.plot(grid, mean, lw=1.2, label=f"{label} (n={len(values)})")
        if len(values) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("identity error")
    ax.set_title("identity error over time (mean over cases and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return base64.b64decode(_png(fig))


# ---------------------------------------------------------------------------------------------- writers
def _page(title: str, body: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "</body></html>")


def write_reports(results: dict, out: Path) -> None:
    """``results.json``, ``report.md`` and ``report.html`` of one run."""
    atomic.write_json(out / "results.json", results)
    whole = md_table({results["suite"]: {**results["whole"], **results.get("set", {}), **results["timing"]}})
    per_case = md_table({r["id"]: {k: v for k, v in r.items() if k not in ("id", "tags")} for r in results["per_case"]})
    windows = md_table(results["windows"])
    tags = md_table(results["tags"])
    failed = "".join(f"- {f['id']}: {f['error']}\n" for f in results["failed"]) or "none\n"
    md = (f"# GenBench `{results['suite']}`\n\nsettings: `{json.dumps(results['settings'])}`\n\n"
          f"## Whole video (mean over {results['cases']} cases)\n\n{whole}\n## Time windows\n\n{windows}\n"
          f"## By tag\n\n{tags}\n## Cases\n\n{per_case}\n## Failed\n\n{failed}")
    atomic.write_text(out / "report.md", md)
    plots = run_plots(results)
    body = [f"<p>settings: <code>{html.escape(json.dumps(results['settings']))}</code></p>",
            f"<h2>Whole video (mean over {results['cases']} cases)</h2>", _html_table(whole),
            "<h2>Time windows</h2>", _html_table(windows)]
    body += [f"<img alt='{k}' src='data:image/png;base64,{v}'>" for k, v in plots.items()]
    body += ["<h2>By tag</h2>", _html_table(tags), "<h2>Cases</h2>", _html_table(per_case),
             "<h2>Failed</h2>", f"<pre>{html.escape(failed)}</pre>"]
    atomic.write_text(out / "report.html", _page(f"GenBench {results['suite']}", body))


def load_run(folder: Path) -> Run:
    """A run of a comparison: its folder's ``results.json`` and its checkpoint's training config."""
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path} not found: not a finished GenBench run") from None
    except (OSError, ValueError) as err:
        raise CompareError(f"{path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(results, dict) or not isinstance(results.get("whole"), dict):
        raise CompareError(f"{path} has no 'whole' scores: not a GenBench results.json")
    settings = results.get("settings") or {}
    return Run(Path(folder), results, list(settings.get("overrides") or []), training_config(settings.get("checkpoint")))


def run_scores(results: dict) -> dict[str, float]:
    """What a comparison shows of one run: whole-video means, set-level scores (FVD, FID) and timing."""
    timing = results.get("timing") or {}
    return {**results["whole"], **(results.get("set") or {}), **{k: timing[k] for k in TIMING if k in timing}}


def _setting(runs: list[Run], members: list[int], scores) -> dict:
    """One row of a comparison: :func:`seed_stats` of ``scores(results)`` over the member runs, their folders
    and their training seeds (None: unknown)."""
    return {**seed_stats([scores(runs[i].results) for i in members]),
            "members": [str(runs[i].folder) for i in members],
            "seeds": [(runs[i].training or {}).get("seed") for i in members]}


def _last_windows(runs: list[Run], groups: list[list[int]], labels: list[str]) -> dict[str, dict]:
    """Each setting over its runs' last time window (``<name> [<window>]``; runs ending in another window make
    a row of their own)."""
    rows = {}
    for label, members in zip(labels, groups):
        by_window: dict[str, list[int]] = {}
        for i in members:
            if runs[i].results.get("windows"):
                by_window.setdefault(list(runs[i].results["windows"])[-1], []).append(i)
        for window, ids in by_window.items():
            rows[f"{label} [{window}]"] = _setting(runs, ids, lambda results, w=window: results["windows"][w])
    return rows


def _html_notes(notes: list[str]) -> str:
    return "".join(f"<p><small>{html.escape(line)}</small></p>" for line in notes)


def compare_runs(folders: list[Path], out: Path, names: list[str] | None = None) -> str:
    """One ablation table over several runs' ``results.json`` (whole-video means, timing and, when present, the
    last window), one row per setting (see the module docstring: runs grouped over training seeds, or by
    ``names``, one per folder, equal names one setting). Writes ``comparison.json`` (``groups``: per row ``mean``,
    ``std``, ``n``, ``counts``, ``members``, ``seeds``; ``rows``: the means alone, as before), ``comparison.md`` and
    ``comparison.html`` to ``out``. Returns the markdown table and its notes."""
    if not folders:
        raise CompareError("no runs to compare")
    if names is not None and len(names) != len(folders):
        raise CompareError(f"{len(names)} names for {len(folders)} run folders: give one name per folder")
    runs = [load_run(folder) for folder in folders]
    groups = group_runs(runs, names)
    labels = [str(names[g[0]]) for g in groups] if names is not None else group_names(runs, groups)
    whole = {label: _setting(runs, g, run_scores) for label, g in zip(labels, groups)}
    last = _last_windows(runs, groups, labels)
    table, notes = seed_table(whole), seed_notes(whole)
    md = f"# GenBench comparison\n\n## Whole video\n\n{table}\n" + "".join(f"{n}\n\n" for n in notes)
    if last:
        md += f"## Last time window\n\n{seed_table(last)}\n" + "".join(f"{n}\n\n" for n in seed_notes(last))
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "comparison.json", {
        "rows": {name: g["mean"] for name, g in whole.items()},
        "last_window": {name: g["mean"] for name, g in last.items()},
        "groups": whole, "last_window_groups": last, "rule": LEGEND})
    atomic.write_text(out / "comparison.md", md)
    body = ["<h2>Whole video</h2>", _html_table(table), _html_notes(notes)]
    plot = comparison_plot({name: g["mean"] for name, g in whole.items()},
                           {name: g["std"] for name, g in whole.items()})
    if plot:
        body.append(f"<img alt='comparison' src='data:image/png;base64,{plot}'>")
    if last:
        body += ["<h2>Last time window</h2>", _html_table(seed_table(last)), _html_notes(seed_notes(last))]
    curves = identity_over_time_plot(runs, groups, labels)
    if curves:  # also a file of its own: the long-horizon figure people paste into notes and READMEs
        atomic.write_bytes(out / "identity_over_time.png", curves)
        body += ["<h2>Identity error over time</h2>",
                 f"<img alt='identity over time' src='data:image/png;base64,{base64.b64encode(curves).decode()}'>"]
    atomic.write_text(out / "comparison.html", _page("GenBench comparison", body))
    return table + "\n" + "\n".join(notes) + "\n"
