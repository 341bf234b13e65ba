"""Helpers shared by the Hydra entry points (``train.py``, ``infer.py``, ...): one-line errors for unknown
config-group choices, before Hydra composes and prints its longer message."""
from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def fail(message: str, status: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def check_group_choices(argv: list[str], groups: tuple[str, ...], conf: Path = CONF) -> None:
    """Exit with one line if an override ``group=value`` names no ``conf/group/value.yaml``."""
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in groups and value and value != "null":
            for choice in value.split(","):  # multirun sweeps over several choices
                if not (conf / key / f"{choice}.yaml").is_file():
                    known = sorted(p.stem for p in (conf / key).glob("*.yaml"))
                    fail(f"{key}={choice}: unknown; choose one of {', '.join(known)}")
