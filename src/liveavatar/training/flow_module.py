"""``FlowMatchingModule``: the LightningModule of Stage 0 (``stage=teacher``) and Stage 1
(``stage=diffusion_forcing``). The loss is :class:`~liveavatar.training.flow_loss.FlowMatchingLoss`; this module
only owns the model, the optimizer and logging.

The model is created in :meth:`configure_model` (not ``__init__``) so that FSDP and DeepSpeed ZeRO-3 can build
a 14B model directly sharded.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import lightning as L
import torch

from ..engine.positions import PositionPolicy
from ..models import AvatarDiT, DiTConfig
from .ema import ParameterEMA
from .flow_loss import FlowLossConfig, FlowMatchingLoss
from .lora import LoraSettings, apply_lora, merged_copy
from .sharding import gathered, mesh_of, shard_dit

STAGES = ("teacher", "diffusion_forcing")


@dataclass
class OptimSettings:
    """``optim.*`` keys."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "constant"     # constant | cosine (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.1
    ema_decay: float | None = None  # an EMA of the trained weights, exported as the model (null: off)
    audio_lr_scale: float = 1.0     # learning-rate multiplier of the audio route (AvatarDiT.is_audio_parameter)


@dataclass
class ModelSettings:
    """How the DiT is built: from scratch, or from a checkpoint (``init_from``), with optional LoRA."""

    dit: dict = field(default_factory=dict)
    window_blocks: int = 3      # Diffusion Forcing's history window, as the engine streams it
    rope: dict = field(default_factory=dict)  # the position policy (model.rope.*), as the engine streams it
    init_from: str | None = None
    gradient_checkpointing: bool = False
    lora: dict = field(default_factory=dict)


class FlowMatchingModule(L.LightningModule):
    """Train an :class:`AvatarDiT` with the flow-matching loss.

    Args:
        stage: ``teacher`` (bidirectional) or ``diffusion_forcing`` (block-causal, a noise level per block).
        model: the DiT config (a dict of :class:`DiTConfig` fields), optional ``init_from`` checkpoint, memory
            and LoRA settings.
        loss: :class:`FlowLossConfig` fields.
        optim: :class:`OptimSettings` fields.
    """

    def __init__(self, stage: str, model: dict, loss: dict, optim: dict):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.save_hyperparameters()
        self.stage = stage
        self.model_settings = ModelSettings(**model)
        self.dit_config = DiTConfig.from_dict(dict(self.model_settings.dit))
        self.lora = LoraSettings(**(self.model_settings.lora or {}))
        self.optim = OptimSettings(**optim)
        positions = PositionPolicy.from_config(self.dit_config.frames_per_block, self.dit_config.reference_position,
                                               self.model_settings.window_blocks, self.model_settings.rope)
        self.loss_fn = FlowMatchingLoss(FlowLossConfig(**loss), causal=stage == "diffusion_forcing",
                                        frames_per_block=self.dit_config.frames_per_block, positions=positions)
        self.model: AvatarDiT | None = None
        self.ema: ParameterEMA | None = None
        self._ema_step = -1

    # ------------------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        settings = self.model_settings
        if settings.init_from:
            model = AvatarDiT.from_pretrained(settings.init_from, config=self.dit_config)
        else:
            model = AvatarDiT(self.dit_config)
        model.gradient_checkpointing = settings.gradient_checkpointing
        if self.lora.enabled:
            apply_lora(model, self.lora)
        mesh = mesh_of(self)
        if mesh is not None:  # trainer=fsdp: sharded block by block
            shard_dit(model, mesh, self.trainer.precision)
        self.model = model
        if self.optim.ema_decay is not None:
            self.ema = ParameterEMA(model, self.optim.ema_decay)

    def export(self) -> AvatarDiT | None:
        """The trained DiT with plain Wan2.1 parameter names (LoRA merged), for ``save_pretrained``. Sharded, it is
        gathered: every rank must call this, and only global rank 0 gets the model (the others None)."""
        model = gathered(self.model, self._plain_model)
        if model is None:
            return None
        if self.ema is not None:
            model = self.ema.copy_to(copy.deepcopy(model))
        return merged_copy(model) if self.lora.enabled else model

    def _plain_model(self) -> AvatarDiT:
        model = AvatarDiT(self.dit_config)
        if self.lora.enabled:
            apply_lora(model, self.lora)
        return model

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self.loss_fn(self.model, batch)
        b = batch["latents"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/x0_error", stats["x0_error"], batch_size=b)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        return loss

    def on_train_start(self) -> None:
        self._ema_step = self.trainer.global_step   # a resumed run's average already holds this step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Once per optimizer step (with gradient accumulation a step spans several batches).
        if self.ema is not None and self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step
            self.ema.update(self.model)

    def param_groups(self) -> list[dict]:
        """The trained parameters as AdamW groups: the audio route (:meth:`AvatarDiT.is_audio_parameter`) in a group
        of its own at ``optim.lr * optim.audio_lr_scale`` when the scale is not 1. It starts from zero-initialised
        additions and carries a small part of the loss (on the toy, the mouth is ~1 % of the pixels)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        scale = float(self.optim.audio_lr_scale)
        if scale == 1.0:
            return [{"params": [p for _, p in named]}]
        audio, rest = [], []
        for n, p in named:
            (audio if AvatarDiT.is_audio_parameter(n) else rest).append(p)
        return [{"params": rest}] + ([{"params": audio, "lr": self.optim.lr * scale}] if audio else [])

    def configure_optimizers(self):
        o = self.optim
        params = self.param_groups()
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
            if o.decay == "cosine" and total:
                progress = min(1.0, step / total)
                return warm * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
            return warm

        if o.decay not in ("constant", "cosine"):
            raise ValueError(f"optim.decay must be constant or cosine, got {o.decay!r}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (f"stage={self.stage}: {n / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trained), "
                f"{asdict(self.loss_fn.config)}")
