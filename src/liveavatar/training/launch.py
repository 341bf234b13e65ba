"""``train.py``'s orchestration: check the run folder, build the module, data, loggers, callbacks and trainer
from the config, fit (resuming when the folder holds this run), then export the weights in the Wan2.1 layout.
:func:`fit` is that life cycle for any stage (``distill.py`` uses it too); :func:`train` is Stages 0 and 1.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from .. import atomic
from .datamodule import AvatarDataModule, DataSettings
from .flow_module import FlowMatchingModule
from .run_folder import RunFolder
from .sharding import FSDP2Strategy
from .strategy import build_strategy, sharded_strategy

log = logging.getLogger(__name__)
KILL_ENV = "LIVEAVATAR_TRAIN_KILL_AT_STEP"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint under a temporary name and rename it: a run killed while saving keeps its previous
    ``last.ckpt`` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class TrainClock(Callback):
    """Wall-clock seconds spent training, carried across resumed launches (saved in the checkpoint)."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def _elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self._elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state["seconds"])

    @property
    def total(self) -> float:
        return self._elapsed()


class KillAtStep(Callback):
    """Fault drill: end the process abruptly (no clean-up, like a lost node) after optimizer step ``step``,
    before that step's checkpoint. Armed by the environment variable ``LIVEAVATAR_TRAIN_KILL_AT_STEP``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(137)


def build_loggers(spec: DictConfig, folder: Path) -> list:
    """Lightning loggers named in ``logger`` (``csv``, ``tensorboard``, ``wandb``), all writing under ``folder``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    loggers = []
    for name, options in (spec or {}).items():
        options = OmegaConf.to_container(options, resolve=True) if options is not None else {}
        if name == "csv":
            loggers.append(CSVLogger(folder, name="csv"))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(folder, name="tensorboard"))
        elif name == "wandb":
            offline = bool(options.pop("offline", True))
            if offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            loggers.append(WandbLogger(save_dir=str(folder), offline=offline, **options))
        else:
            raise ValueError(f"logger.{name}: unknown logger (csv, tensorboard, wandb)")
    return loggers


def build_module(cfg: DictConfig) -> FlowMatchingModule:
    model = {
        "dit": OmegaConf.to_container(cfg.model.dit, resolve=True),
        "window_blocks": int(cfg.model.get("window_blocks", 3)),
        "rope": OmegaConf.to_container(cfg.model.rope, resolve=True) if cfg.model.get("rope") else {},
        "init_from": cfg.init_from,
        "gradient_checkpointing": bool(cfg.memory.gradient_checkpointing),
        "lora": OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora else {},
    }
    return FlowMatchingModule(cfg.stage, model, OmegaConf.to_container(cfg.loss, resolve=True),
                              OmegaConf.to_container(cfg.optim, resolve=True))


def trainer_arguments(cfg: DictConfig) -> dict:
    """``trainer.*`` keys as ``L.Trainer`` arguments (the strategy built from its name and options)."""
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["strategy"] = build_strategy(args.pop("strategy", "auto"))
    return args


def launches(run: RunFolder) -> int:
    """Count and record the launches of a run (resumed launches draw fresh random numbers)."""
    path = run.path / "launches.txt"
    n = int(path.read_text()) if path.is_file() else 0
    path.write_text(str(n + 1))
    return n


def route_lightning_logs() -> None:
    """Lightning prints through its own console handler; under Hydra, whose handlers already print and keep a
    log file, that shows every line twice. Let Lightning's records go through Hydra's handlers only."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or continue) the training ``cfg`` describes in ``run_dir``; return the figures of ``done.json``."""

    sharded = sharded_strategy(cfg.trainer)
    if sharded and cfg.optim.get("ema_decay") is not None:
        raise ValueError(f"optim.ema_decay with trainer={sharded}: the EMA keeps whole copies of the trained weights "
                         "and is not implemented for sharded ones; set optim.ema_decay=null")

    def setup():
        module = build_module(cfg)
        settings = DataSettings(**OmegaConf.to_container(cfg.data, resolve=True))
        settings.mouth_regions = module.loss_fn.config.mouth_weight > 0   # the loss weights them
        data = AvatarDataModule(settings, module.dit_config, OmegaConf.to_container(cfg.model, resolve=True))
        data.setup("fit")  # fail on unusable data before the trainer starts
        if data.settings.motion_frames:
            module.loss_fn.check_motion(data.settings.motion_frames, data.settings.latent_frames)
        return module, data

    return fit(cfg, run_dir, setup, stage=cfg.stage)


def fit(cfg: DictConfig, run_dir: Path, setup: Callable[[], tuple[L.LightningModule, L.LightningDataModule]],
        stage: str, loss_key: str = "train/loss") -> dict:
    """The run-folder life cycle every stage shares: check the folder against ``cfg`` (resume, refuse, overwrite),
    seed, build the module and data (``setup``, after the folder check), fit with the loggers, the periodic
    atomic checkpoint and the kill drill, then write the last checkpoint, the exported ``model/``, the loss plot
    of ``loss_key`` and ``done.json``. ``cfg`` needs ``seed``, ``run.*``, ``trainer.*``, ``logger`` and
    ``progress``; the module needs ``model`` (counted) and ``export()``."""
    route_lightning_logs()
    # Lightning warns that a mid-epoch resume replays the epoch; ClipOrder (datamodule.py) continues it instead.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    run = RunFolder(run_dir)
    resume_from = run.prepare(cfg, resume=bool(cfg.run.resume), overwrite=bool(cfg.run.overwrite))
    L.seed_everything(int(cfg.seed) + launches(run), workers=True, verbose=False)
    if resume_from:
        log.info("resuming %s from %s", run.path, resume_from)

    module, data = setup()
    clock = TrainClock()
    callbacks: list[Callback] = [clock, ModelCheckpoint(dirpath=run.checkpoints, filename="step{step:07d}",
                                                        every_n_train_steps=int(cfg.run.checkpoint_every),
                                                        save_top_k=0, save_last=True,
                                                        # always last.ckpt, also in a moved run folder
                                                        enable_version_counter=False)]
    if os.environ.get(KILL_ENV):
        callbacks.append(KillAtStep(int(os.environ[KILL_ENV])))
    args = trainer_arguments(cfg)
    strategy = args["strategy"]
    # Single-file checkpoints are written atomically (a folder of shards is the strategy's own).
    one_file = strategy in ("auto", "ddp") or (isinstance(strategy, FSDP2Strategy)
                                               and not strategy.distributed_checkpoint)
    plugins = [AtomicCheckpointIO()] if one_file else None
    trainer = L.Trainer(**args, logger=build_loggers(cfg.logger, run.logs), callbacks=callbacks, plugins=plugins,
                        default_root_dir=str(run.path), enable_progress_bar=bool(cfg.progress),
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    trainer.save_checkpoint(run.last_checkpoint)

    done = {"stage": stage, "steps": int(trainer.global_step), "train_seconds": round(clock.total, 1),
            "final_loss": _metric(trainer, loss_key), "parameters": sum(p.numel() for p in module.model.parameters())}
    exported = module.export()  # on every rank: a sharded model is gathered collectively
    if trainer.is_global_zero:
        exported.save_pretrained(run.model)
        plot_loss(run.logs / "csv", run.path / "loss.png", loss_key)
        atomic.write_json(run.done, done)
    return done


def _metric(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return round(float(value), 5) if isinstance(value, torch.Tensor) else None


def read_losses(csv_root: Path, key: str = "train/loss") -> tuple[list[int], list[float]]:
    """``(steps, losses)`` of ``key`` logged by the CSV logger over every launch of a run (later launches win)."""
    import csv

    by_step: dict[int, float] = {}
    for metrics in sorted(csv_root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss(csv_root: Path, out: Path, key: str = "train/loss") -> Path | None:
    """Plot the training loss ``key`` to ``out`` (PNG); skipped when matplotlib or the CSV log is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses = read_losses(csv_root, key)
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key.removeprefix("train/").replace("_", " "))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
