"""The folder of one training run: its config, its checkpoints, its logs and its exported weights.

A run is identified by its folder. Starting ``train.py`` again with the same command finds the folder's
``config.yaml`` equal to the new config and continues from ``checkpoints/last.ckpt`` with the same step count.
A folder that holds a *different* run is never overwritten silently: the start is refused with one line unless
``run.overwrite=true`` is given, which removes the old checkpoints first.

Layout::

    <run.dir>/config.yaml            the resolved config of the run (written when the run starts)
    <run.dir>/checkpoints/last.ckpt  Lightning checkpoint (written atomically)
    <run.dir>/logs/                  CSV / TensorBoard / W&B logs
    <run.dir>/model/                 final weights in the Wan2.1 layout (``infer.py checkpoint=<run.dir>/model``)
    <run.dir>/done.json              written last: steps, wall time, final loss
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import atomic

# Keys that may change between the launches of one run: how long it goes on and how it is watched.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.max_time", "trainer.log_every_n_steps", "logger", "run.resume",
                     "run.overwrite", "run.checkpoint_every", "progress", "data.num_workers")


# What Hydra writes into the run folder before the run starts (its log file), not a sign of another run.
HYDRA_FILES = (".hydra", "train.log", "distill.log")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (one line for the user)."""


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, object]:
    """A nested config (plain dicts, as ``OmegaConf.to_container`` or ``yaml.safe_load`` give it) as one flat dict of
    dotted keys: ``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}``.

    Every non-empty dict is walked into; any other value, an empty dict and a list included, is one entry as it is.
    ``prefix`` goes before every key (``"model."`` gives ``model.dit.dim``). Used to compare two runs' configs key by
    key (:func:`config_differences`, GenBench's report of what differs between the runs it compares)."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring :data:`RESUMABLE_CHANGES`."""
    a, b = flatten_config(old), flatten_config(new)
    keys = sorted(set(a) | set(b))
    allowed = tuple(RESUMABLE_CHANGES)
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == p or k.startswith(p + ".") for p in allowed)]


@dataclass
class RunFolder:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    def prepare(self, cfg: DictConfig, resume: bool = True, overwrite: bool = False) -> Path | None:
        """Check the folder against ``cfg`` and return the checkpoint to resume from (None: a fresh start).

        Raises :class:`RunFolderError` when the folder holds another run (and ``overwrite`` is false), or holds
        this run but ``resume`` is false.
        """
        new = OmegaConf.to_container(cfg, resolve=True)
        if self.config_path.is_file():
            old = OmegaConf.to_container(OmegaConf.load(self.config_path), resolve=True)
            changed = config_differences(old, new)
            if changed and not overwrite:
                shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
                raise RunFolderError(
                    f"run.dir={self.path} holds a different run (it differs in {shown}); choose another run.dir "
                    "or name=, or pass run.overwrite=true to start over there"
                )
            if not changed and self.last_checkpoint.is_file():
                if not resume:
                    raise RunFolderError(
                        f"run.dir={self.path} already holds this run's checkpoints; pass run.resume=true to "
                        "continue it or run.overwrite=true to start over"
                    )
                self._write_config(cfg)  # keep the latest resumable keys (e.g. a longer max_steps)
                return self.last_checkpoint
            if changed:
                self.clear()
        elif self.path.is_dir() and any(p.name not in HYDRA_FILES for p in self.path.iterdir()) and not overwrite:
            raise RunFolderError(
                f"run.dir={self.path} exists and holds files that are not a training run; choose another run.dir "
                "or pass run.overwrite=true"
            )
        elif overwrite and self.path.is_dir():
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_config(cfg)
        return None

    def clear(self) -> None:
        """Remove what an earlier run left (checkpoints, exported model, logs, done marker)."""
        for sub in (self.checkpoints, self.model, self.logs):
            shutil.rmtree(sub, ignore_errors=True)
        for f in (self.done, self.config_path):
            f.unlink(missing_ok=True)

    def _write_config(self, cfg: DictConfig) -> None:
        atomic.write_text(self.config_path, OmegaConf.to_yaml(cfg, resolve=True))
