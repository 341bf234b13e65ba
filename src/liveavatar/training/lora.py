"""LoRA adapters on the DiT's linear layers through peft (the 14B recipe trains adapters, not the base).

The modules this project adds to Wan2.1 (audio projection and attention, reference embedding) have no
pretrained weights, so they are trained in full next to the adapters.
"""
from __future__ import annotations

import copy
import fnmatch
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.checkpoint import is_addition


@dataclass
class LoraSettings:
    """``lora.*`` keys: rank 0 turns LoRA off."""

    rank: int = 0
    alpha: float | None = None           # default: equal to the rank (scale 1)
    dropout: float = 0.0
    # Linear layers by name suffix (``*`` matches anything): attention projections and the feed-forward of every
    # block, and the s2v family's audio injection (Live Avatar's released LoRA adapts all of them).
    targets: list[str] = field(default_factory=lambda: ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                         "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                         "cross_attn.o", "ffn.0", "ffn.2",
                                                         "audio_injector.injector.*.q", "audio_injector.injector.*.k",
                                                         "audio_injector.injector.*.v", "audio_injector.injector.*.o"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def _require_peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("lora.rank > 0 needs peft: pip install 'liveavatar[lora]'") from err
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = "default",
               train_additions: bool = True, seed: int = 0) -> nn.Module:
    """Insert LoRA adapters in place (peft ``inject_adapter_in_model``); freeze the base weights, keep the
    adapters (and, with ``train_additions``, this project's additions) trainable. Returns ``model``.

    ``train_additions=False`` is for a base that another role reads unadapted (Stage 2's critic shares the
    teacher's weights): training the additions in full would change that role too."""
    peft = _require_peft()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
             any(fnmatch.fnmatchcase(n, "*" + t) for t in settings.targets) and not is_addition(n)]
    if not names:
        raise ValueError(f"lora.targets={list(settings.targets)} match no linear layer of the model")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                             lora_dropout=settings.dropout, target_modules=names)
    # The adapters' random initialisation from its own seed, not from whatever the global generator holds by now
    # (process-group set-up and samplers draw from it differently on one and on several ranks).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(adapter_name.encode()))  # each adapter its own draws
        peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or (train_additions and is_addition(name)))
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA adapter merged into its base layer (plain Wan key names again)."""
    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.base_layer)
    return merged
