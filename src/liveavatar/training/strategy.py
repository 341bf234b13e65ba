"""Lightning strategies by name (``trainer.strategy``): ``auto`` / ``ddp`` as Lightning has them, ``fsdp``
(PyTorch's FSDP2, every DiT block its own shard unit: :mod:`.sharding`), and DeepSpeed ZeRO stages 2 and 3 (a
single optimizer only, as Lightning's DeepSpeed strategy requires)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

NAMES = ("auto", "ddp", "fsdp", "deepspeed")


def strategy_name(trainer: Any) -> str:
    """The strategy's name in a ``trainer`` config section: ``trainer.strategy`` itself when it is a name
    (``auto``, ``ddp``), else its mapping's ``name`` (``fsdp``, ``deepspeed``); ``auto`` when it is absent."""
    strategy = trainer.get("strategy", "auto")
    return strategy if isinstance(strategy, str) else strategy.get("name")


def sharded_strategy(trainer: Any) -> str | None:
    """``fsdp`` or ``deepspeed_zero3`` (the ``trainer=`` preset's name) when the ``trainer`` section's strategy shards
    the parameters themselves across ranks, else None (one device, DDP and ZeRO-2 keep whole parameters on each
    rank). What an EMA of whole weights cannot follow: ``train.py`` and ``distill.py`` refuse an EMA under these."""
    name = strategy_name(trainer)
    if name == "fsdp":
        return "fsdp"
    if name == "deepspeed" and int(trainer.get("strategy").get("stage", 0)) == 3:
        return "deepspeed_zero3"
    return None


def build_strategy(spec: Any):
    """``spec`` is a name (``auto``, ``ddp``) or a mapping ``{name: fsdp|deepspeed, ...options}``.

    fsdp options: ``state_dict_type`` (``full``: rank 0 gathers one checkpoint file; ``sharded``: each rank writes
    its shard into a checkpoint folder). Activation checkpointing is the model's own
    (``memory.gradient_checkpointing``), the mixed precision follows ``trainer.precision``
    (:func:`.sharding.mixed_precision`).
    deepspeed options: ``stage`` (2 or 3), ``offload_optimizer``, ``offload_parameters``.
    """
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        if spec not in ("auto", "ddp"):
            raise ValueError(f"trainer.strategy={spec}: use auto, ddp, or a mapping with name fsdp/deepspeed")
        return spec
    options = dict(spec)
    name = options.pop("name", None)
    if name in ("auto", "ddp"):
        return name
    if name == "fsdp":
        from .sharding import FSDP2Strategy

        kind = options.pop("state_dict_type", "full")
        if kind not in ("full", "sharded"):
            raise ValueError(f"trainer.strategy.state_dict_type={kind}: expected full or sharded")
        strategy = FSDP2Strategy(distributed_checkpoint=kind == "sharded")
    elif name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ValueError("trainer.strategy.name=deepspeed needs DeepSpeed: pip install 'liveavatar[deepspeed]'") from err
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(
            stage=int(options.pop("stage", 2)),
            offload_optimizer=options.pop("offload_optimizer", False),
            offload_parameters=options.pop("offload_parameters", False),
        )
    else:
        raise ValueError(f"trainer.strategy.name={name}: expected one of {NAMES}")
    if options:
        raise ValueError(f"trainer.strategy: unknown options for {name}: {', '.join(sorted(options))}")
    return strategy
