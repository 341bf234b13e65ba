"""Which metrics a GenBench run computes (filled in as the metric modules land)."""
from __future__ import annotations


def general_metrics(paths) -> list:
    """The metrics applied to every case: ``paths`` names the weights of the weighted ones."""
    return []
