"""Helpers shared by the Hydra entry points (``train.py``, ``infer.py``, ...): one-line errors for unknown
config-group choices, before Hydra composes and prints its longer message; the ``sweep_dirname`` resolver that
names a sweep job's folder."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"
# A file name may have 255 bytes; keep room for the suffixes tools add (".tmp", "-<hash>").
MAX_DIRNAME = 120


def sweep_dirname(overrides: str) -> str:
    """One folder name for a sweep job from its ``key=value,...`` overrides: path separators become ``_`` (a
    ``checkpoint=a/b/model`` override would otherwise nest folders), and a name too long for the file system is cut
    and made unique again with a hash of the whole."""
    name = overrides.replace("/", "_") or "default"
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME - 11]}-{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"
    return name


if not OmegaConf.has_resolver("sweep_dirname"):
    OmegaConf.register_new_resolver("sweep_dirname", sweep_dirname)


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
