"""Weights of the weighted metrics come from local paths (nothing is downloaded): a missing one is one line naming
the metric, the config key and what to fetch, and the run goes on with the other metrics."""
from __future__ import annotations

from pathlib import Path


class MissingWeights(ValueError):
    """A weighted metric's weights are not where the config says (one line for the user)."""


def require_path(metric: str, key: str, path, what: str) -> Path:
    """``path`` as a Path, or :class:`MissingWeights` naming ``metric``, its config ``key`` and ``what`` to get."""
    if not path:
        raise MissingWeights(f"{metric}: {key} is not set (download {what} and pass {key}=PATH)")
    p = Path(path)
    if not p.exists():
        raise MissingWeights(f"{metric}: {key}={p} not found (download {what})")
    return p
