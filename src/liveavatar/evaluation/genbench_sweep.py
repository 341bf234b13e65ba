"""The Hydra callback that ends a GenBench sweep (``eval/genbench.py -m ...``) with one comparison table of all its
jobs (``comparison.md``, ``comparison.html``, ``comparison.json`` in the sweep folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CompareOnSweepEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .genbench_report import compare_runs

        sweep = Path(config.hydra.sweep.dir)
        # Job folders are named by their overrides, which may hold paths (checkpoint=a/b): search the whole tree.
        folders = sorted(p.parent for p in sweep.rglob("results.json") if p.parent != sweep)
        if len(folders) < 1:
            return
        table = compare_runs(folders, sweep)
        print(f"\nGenBench comparison of {len(folders)} runs ({sweep / 'comparison.html'}):\n{table}")
