"""``distill.py``'s orchestration: check the config, build the :class:`DMDModule` and the data, and run them through
the run-folder life cycle of :func:`~liveavatar.training.launch.fit` (resume, refusal, checkpoints, kill drill,
export of the generator, ``done.json``)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .adversarial import AdversarialModule
from .datamodule import AvatarDataModule, DataSettings
from .dmd import DMDModule
from .launch import fit
from .ode_init import ODEInitModule
from .strategy import sharded_strategy, strategy_name

STAGES = ("dmd", "ode_init", "adversarial")

# Fault drill: ``role:step`` (``critic:3``, ``generator:0``) makes that role's loss NaN at that generator step.
NAN_ENV = "LIVEAVATAR_DISTILL_NAN_AT"


def parse_drill(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    role, _, step = value.partition(":")
    if role not in ("generator", "critic") or not step.isdigit():
        raise ValueError(f"{NAN_ENV}={value!r}: expected generator:STEP or critic:STEP")
    return role, int(step)


def check_trainer(cfg: DictConfig) -> None:
    """Refuse, in one line, trainer settings that two manually stepped optimizers cannot use."""
    t = cfg.trainer
    name = strategy_name(t)
    if name == "deepspeed":
        raise ValueError("trainer=deepspeed_*: Lightning's DeepSpeed strategy takes a single optimizer and "
                         "distillation steps two (generator and critic); use trainer=fsdp for several GPUs")
    if name == "ddp":
        raise ValueError("trainer.strategy=ddp: distillation runs several backward passes per step, which DDP's "
                         "gradient hooks do not allow; use trainer=fsdp for several GPUs (or strategy=auto)")
    if t.get("gradient_clip_val") is not None:
        raise ValueError("trainer.gradient_clip_val: distillation clips each role itself; set optim.clip_grad_norm "
                         "and leave trainer.gradient_clip_val=null")
    if int(t.get("accumulate_grad_batches", 1)) != 1:
        raise ValueError("trainer.accumulate_grad_batches must be 1 for distillation (manual optimization); "
                         "grow data.batch_size, or use distill.blockwise=true to save memory")
    if str(t.get("precision")).startswith("16"):
        raise ValueError(f"trainer.precision={t.precision}: float16 needs loss scaling, which the two manually "
                         "stepped optimizers do not do; use bf16-mixed, bf16-true or 32-true")
    if name == "fsdp" and cfg.get("stage", "dmd") == "adversarial":
        raise ValueError("stage=adversarial with trainer=fsdp: the discriminator's Q-Formers and heads are not "
                         "sharded or synchronised across ranks yet; run it on one device (strategy=auto)")
    sharded = sharded_strategy(t)  # fsdp here: deepspeed is refused above
    if sharded and cfg.distill.ema_decay is not None:
        raise ValueError(f"distill.ema_decay with trainer={sharded}: the EMA keeps unsharded copies of the "
                         "generator's trained weights and is not implemented for sharded ones; set "
                         "distill.ema_decay=null")


def model_keys(cfg: DictConfig) -> dict:
    """The model keys a Stage 2 module takes: the DiT, and the streaming window, sink contents and position policy."""
    return {
        "dit": OmegaConf.to_container(cfg.model.dit, resolve=True),
        "window_blocks": int(cfg.model.get("window_blocks", 3)),
        "sink_motion": bool(cfg.model.get("sink_motion", False)),
        "rope": OmegaConf.to_container(cfg.model.rope, resolve=True) if cfg.model.get("rope") else {},
    }


def section(cfg: DictConfig, key: str) -> dict:
    """``cfg[key]`` as a plain dict (empty when absent)."""
    return OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) else {}


def build_dmd_module(cfg: DictConfig) -> DMDModule:
    model, container = model_keys(cfg), lambda key: section(cfg, key)  # noqa: E731
    return DMDModule(model, cfg.generator_from, cfg.teacher_from, container("distill"), container("loss"),
                     container("optim"), container("lora"), bool(cfg.memory.gradient_checkpointing), int(cfg.seed),
                     drill=parse_drill(os.environ.get(NAN_ENV)))


def build_adversarial_module(cfg: DictConfig) -> AdversarialModule:
    model, container = model_keys(cfg), lambda key: section(cfg, key)  # noqa: E731
    return AdversarialModule(model, cfg.generator_from, cfg.teacher_from, container("distill"), container("loss"),
                             container("optim"), container("lora"), container("adversarial"),
                             bool(cfg.memory.gradient_checkpointing), int(cfg.seed),
                             drill=parse_drill(os.environ.get(NAN_ENV)))


def build_ode_module(cfg: DictConfig) -> ODEInitModule:
    model, container = model_keys(cfg), lambda key: section(cfg, key)  # noqa: E731
    if int(cfg.lora.get("rank", 0)) > 0:
        raise ValueError("stage=ode_init trains the full student; set lora.rank=0 (LoRA is for the DMD stage)")
    return ODEInitModule(model, cfg.generator_from, cfg.teacher_from, container("distill"), container("loss"),
                         container("optim"), container("ode"), int(cfg.seed))


def distill(cfg: DictConfig, run_dir: Path) -> dict:
    """Run (or continue) the distillation ``cfg`` describes in ``run_dir``; return the figures of ``done.json``."""
    check_trainer(cfg)
    # Lightning's notes on what is deliberate here: the frozen teacher is in eval mode, and checkpoints hold the
    # weights after each optimizer step.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    stage = cfg.get("stage", "dmd")
    if stage not in STAGES:
        raise ValueError(f"stage={stage}: expected one of {', '.join(STAGES)}")
    # config errors surface before the run folder is touched
    builders = {"dmd": build_dmd_module, "ode_init": build_ode_module, "adversarial": build_adversarial_module}
    module = builders[stage](cfg)
    f = module.dit_config.frames_per_block
    if cfg.data.kind == "toy" and int(cfg.data.latent_frames) % f:
        raise ValueError(f"data.latent_frames={cfg.data.latent_frames}: the rollout needs whole blocks of "
                         f"{f} latent frames (model.dit.frames_per_block)")

    def setup():
        data = AvatarDataModule(DataSettings(**OmegaConf.to_container(cfg.data, resolve=True)), module.dit_config,
                                OmegaConf.to_container(cfg.model, resolve=True))
        data.setup("fit")
        return module, data

    return fit(cfg, run_dir, setup, stage=stage,
               loss_key="train/ode_loss" if stage == "ode_init" else "train/generator_loss")
