"""GenBench's reports: one run's aggregate (``results.json``, ``report.md``, ``report.html``) and the comparison of
several runs (a Hydra ``-m`` sweep, or folders given by hand) as one ablation table.

The HTML is self-contained (plots embedded as PNG data URIs), so it can be mailed or attached to an issue.
Plots: metrics per time window (long runs), the identity error over time of each toy case, and, for a comparison,
one bar chart per metric across settings.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .. import atomic

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


# ----------------------------------------------------------------------------------------------- tables
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
                if c in CLOSEST_TO_ZERO:
                    marks[c] = min(values, key=lambda n: abs(values[n]))
                else:
                    marks[c] = (min if c in LOWER_IS_BETTER else max)(values, key=values.get)
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


def comparison_plot(rows: dict[str, dict[str, float]]) -> str | None:
    plt = _pyplot()
    if plt is None or not rows:
        return None
    metrics = sorted({k for r in rows.values() for k in r})
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.bar(range(len(rows)), [r.get(m, np.nan) for r in rows.values()])
        ax.set_xticks(range(len(rows)), list(rows), rotation=60, fontsize=6)
        ax.set_title(m, fontsize=9)
    return _png(fig)


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


def compare_runs(folders: list[Path], out: Path, names: list[str] | None = None) -> str:
    """One ablation table over several runs' ``results.json`` (whole-video means, timing and, when present, the
    last window); writes ``comparison.json``, ``comparison.md`` and ``comparison.html`` to ``out``. Returns the
    markdown table."""
    rows, last_window = {}, {}
    loaded = [json.loads((Path(folder) / "results.json").read_text()) for folder in folders]
    overrides = [results["settings"].get("overrides") or [] for results in loaded]
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    for i, (folder, results) in enumerate(zip(folders, loaded)):
        # Name a run by what sets it apart from the others (the swept keys).
        own = " ".join(o for o in overrides[i] if o not in shared)
        name = names[i] if names else (own or Path(folder).name)
        rows[name] = {**results["whole"], **results.get("set", {}),
                      **{k: results["timing"][k] for k in TIMING if k in results["timing"]}}
        if results["windows"]:
            last = list(results["windows"])[-1]
            last_window[f"{name} [{last}]"] = results["windows"][last]
    table = md_table(rows, best=True)
    md = f"# GenBench comparison\n\n## Whole video\n\n{table}\n"
    if last_window:
        md += f"## Last time window\n\n{md_table(last_window, best=True)}\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "comparison.json", {"rows": rows, "last_window": last_window})
    atomic.write_text(out / "comparison.md", md)
    body = ["<h2>Whole video</h2>", _html_table(table)]
    plot = comparison_plot(rows)
    if plot:
        body.append(f"<img alt='comparison' src='data:image/png;base64,{plot}'>")
    if last_window:
        body += ["<h2>Last time window</h2>", _html_table(md_table(last_window, best=True))]
    atomic.write_text(out / "comparison.html", _page("GenBench comparison", body))
    return table
