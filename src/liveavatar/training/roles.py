"""The three models of Stage 2 and where their weights come from.

- **generator**: the causal student, from the Stage 1 checkpoint (``generator_from``); trained.
- **teacher** (real score): the bidirectional Stage 0 model (``teacher_from``); frozen.
- **critic** (fake score): starts as the teacher; trained on the generator's samples.

Full weights (``lora.rank=0``): three separate models. With LoRA (``lora.rank>0``) the teacher and the critic are
ONE model in memory: the teacher's frozen weights with a ``critic`` adapter; the teacher is that model with its
adapters switched off (:func:`adapters_off`), so the critic starts exactly at the teacher. The additions (audio
modules, reference embedding) of that shared model stay frozen, as the teacher must not change. The generator is
its own frozen Stage 1 weights with a ``generator`` adapter (and its additions trained in full, as in Stage 1):
Stage 1 exports merged weights, which differ from the teacher's, so it cannot share that base.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..models import AvatarDiT, DiTConfig
from .lora import LoraSettings, apply_lora


@dataclass
class Roles:
    generator: AvatarDiT
    critic: AvatarDiT
    teacher: AvatarDiT | None   # None: the teacher is the critic with its adapters off


def load_role(path: str | None, config: DiTConfig) -> AvatarDiT:
    """A DiT from a checkpoint, or freshly initialised when ``path`` is None (tests, meta-device builds)."""
    return AvatarDiT.from_pretrained(path, config=config) if path else AvatarDiT(config)


def build_roles(config: DiTConfig, generator_from: str | None, teacher_from: str | None, lora: LoraSettings,
                gradient_checkpointing: bool = False) -> Roles:
    """Build the generator, critic and (full weights only) teacher; trainable flags set as each role needs."""
    generator = load_role(generator_from, config)
    critic = load_role(teacher_from, config)
    teacher = None
    if lora.enabled:
        apply_lora(generator, lora, adapter_name="generator", train_additions=True)
        apply_lora(critic, lora, adapter_name="critic", train_additions=False)
    else:
        teacher = load_role(teacher_from, config).requires_grad_(False).eval()
    for model in (generator, critic):
        model.gradient_checkpointing = gradient_checkpointing
    return Roles(generator, critic, teacher)


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without its LoRA adapters for the duration (peft's own switch; it also clears and restores the
    adapters' ``requires_grad``, which the ``with`` block never needs since score forwards take no gradient)."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class TeacherView:
    """The teacher when it shares the critic's weights: calls the critic with its adapters off; every other
    attribute (``parameters``, ``audio_proj``, ``config``) is the critic's."""

    def __init__(self, critic: nn.Module):
        self.critic = critic

    def __call__(self, *args, **kwargs):
        with adapters_off(self.critic):
            return self.critic(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.critic, name)
