"""An exponential moving average of a model's trained parameters (Stage 2 exports the generator's average).

Only parameters that train are averaged (with LoRA: the adapters and the additions), so the average costs what the
trained part costs. The averages are buffers of this module: they follow the module to its device, are saved in
the training checkpoint and come back on resume. They stay at least float32 even when the module is cast to bf16
(``trainer.precision=bf16-true``): a ``1 - decay`` step is below bf16's resolution.
"""
from __future__ import annotations

import torch
from torch import nn


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _buffer_name(parameter: str) -> str:
    return parameter.replace(".", "__")


class ParameterEMA(nn.Module):
    """``avg <- decay * avg + (1 - decay) * param`` for each trained parameter of ``model``, after each step.

    Args:
        model: the model whose trained (``requires_grad``) parameters are averaged; the averages start at their
            current values.
        decay: the weight of the old average (e.g. 0.99).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"distill.ema_decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(_buffer_name(name), _at_least_float32(p.detach().clone()))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.names:
            setattr(self, _buffer_name(name), _at_least_float32(getattr(self, _buffer_name(name))))
        return self

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, _buffer_name(n)) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every average toward the model's current value (on the device, no host sync)."""
        params = dict(model.named_parameters())
        for name, avg in zip(self.names, self.averages()):
            avg.lerp_(params[name].detach().to(avg.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Write the averages into ``model``'s parameters of the same names; returns ``model``. (Unsharded models
        only: the training entry points refuse an EMA under FSDP and DeepSpeed ZeRO-3.)"""
        params = dict(model.named_parameters())
        for name, avg in zip(self.names, self.averages()):
            params[name].copy_(avg.to(device=params[name].device, dtype=params[name].dtype))
        return model
