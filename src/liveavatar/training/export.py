"""The trained model inside a training checkpoint (``<run>/checkpoints/*.ckpt`` of ``train.py`` or ``distill.py``),
so that a run's intermediate checkpoints can be streamed and evaluated like its final ``model/`` export.

- Stage 0/1 checkpoints hold the model under ``model.``; Stage 2 (DMD and ODE init) the generator under
  ``generator.`` and, when the run keeps one, its EMA under ``ema.`` (what ``model/`` exports).
- LoRA runs hold adapters that must be merged; those are refused with one line (stream their ``model/``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..models import AvatarDiT, DiTConfig


class TrainingCheckpointError(ValueError):
    """A checkpoint this module cannot turn into a model (one line for the user)."""


def model_from_training_checkpoint(path: str | Path, ema: bool = True) -> AvatarDiT:
    """The model a training run would export at this checkpoint: Stage 0/1's model, or Stage 2's generator (its EMA
    when the run kept one and ``ema``). On the CPU, float32, in eval mode."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        dit = state["hyper_parameters"]["model"]["dit"]
        weights = state["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        raise TrainingCheckpointError(f"{path}: not a train.py / distill.py checkpoint ({err})") from err
    prefix = "generator." if any(k.startswith("generator.") for k in weights) else "model."
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if any("lora_" in k for k in own):
        raise TrainingCheckpointError(f"{path}: a LoRA run's checkpoint (adapters to merge); stream its model/ export")
    model = AvatarDiT(DiTConfig.from_dict(dict(dit)))
    missing, unexpected = model.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise TrainingCheckpointError(f"{path}: weights do not match the run's model config "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    averages = {k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")}
    if ema and averages:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for buffer, value in averages.items():
                params[buffer.replace("__", ".")].copy_(value.to(torch.float32))
    return model.float().eval()
