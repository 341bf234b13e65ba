"""Released LoRA weights (Live Avatar's over Wan2.2-S2V-14B, or any peft/kohya-style LoRA over a Wan DiT), read and
merged into the base: ``W <- W + (alpha / rank) B A`` for every adapted linear layer, so that the engines stream
plain weights at full speed.

Key forms read (``M`` is the module name in the base, e.g. ``blocks.0.self_attn.q``):

- peft: ``[base_model.model.]M.lora_A[.<adapter>].weight`` ``[r, in]`` and ``M.lora_B[.<adapter>].weight`` ``[out, r]``
  (Live Avatar's release loads its file through peft, adding ``base_model.model.`` where it is missing);
- kohya/diffusers: ``[diffusion_model.]M.lora_down.weight``, ``M.lora_up.weight``, and an optional ``M.alpha``.

``alpha`` comes from the file (``M.alpha``), else from an ``adapter_config.json`` beside it (peft's ``lora_alpha``),
else from the caller (the preset's ``lora.alpha``); with none of them the scale is 1.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _read_file, _short

PREFIXES = ("base_model.model.", "diffusion_model.", "model.diffusion_model.")
KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<peft>lora_[AB])(?:\.[^.]+)?\.weight|(?P<kohya>lora_down|lora_up)\.weight"
                 r"|(?P<alpha>alpha))$")


@dataclass
class LoraPair:
    down: torch.Tensor | None = None  # A [r, in]
    up: torch.Tensor | None = None    # B [out, r]
    alpha: float | None = None


def lora_files(path: str | Path) -> tuple[list[Path], dict]:
    """The ``.safetensors`` files of a LoRA file or folder, and its ``adapter_config.json`` (empty if none)."""
    path = Path(path)
    if path.is_file():
        files, folder = [path], path.parent
    elif path.is_dir():
        files, folder = sorted(path.glob("*.safetensors")), path
    else:
        raise CheckpointError(f"lora {path} does not exist")
    if not files:
        raise CheckpointError(f"lora {path} holds no .safetensors file")
    config = folder / "adapter_config.json"
    return files, (json.loads(config.read_text()) if config.is_file() else {})


def read_lora(path: str | Path) -> tuple[dict[str, LoraPair], dict]:
    """Module name -> its LoRA pair, and the adapter config; one clear error for keys that are not LoRA keys."""
    files, config = lora_files(path)
    pairs: dict[str, LoraPair] = {}
    foreign = []
    for f in files:
        for key, tensor in _read_file(f).items():
            for prefix in PREFIXES:
                key = key.removeprefix(prefix)
            match = KEY.match(key)
            if match is None:
                foreign.append(key)
                continue
            pair = pairs.setdefault(match["module"], LoraPair())
            if match["alpha"]:
                pair.alpha = float(tensor)
            elif (match["peft"] or match["kohya"]) in ("lora_A", "lora_down"):
                pair.down = tensor
            else:
                pair.up = tensor
    if foreign:
        raise CheckpointError(f"lora {path} holds keys that are not LoRA weights ({len(foreign)}): {_short(foreign)}")
    half = [m for m, p in pairs.items() if p.down is None or p.up is None]
    if half:
        raise CheckpointError(f"lora {path}: modules with only one of the two LoRA matrices: {_short(half)}")
    return pairs, config


@torch.no_grad()
def merge_lora(model: torch.nn.Module, path: str | Path, alpha: float | None = None,
               strength: float = 1.0) -> dict[str, int]:
    """Merge the LoRA at ``path`` into ``model`` in place (see the module doc for ``alpha``); ``strength`` scales it.

    Every adapted module must be a linear layer of the model whose shapes fit the pair, or nothing is changed and
    one :class:`CheckpointError` lists the problems. Returns ``{"modules": n, "rank": r}``.
    """
    pairs, config = read_lora(path)
    modules = dict(model.named_modules())
    problems = []
    absent = [m for m in pairs if not isinstance(modules.get(m), torch.nn.Linear)]
    if absent:
        problems.append(f"modules not in the base model ({len(absent)}): {_short(absent)}")
    shapes = [f"{m}: A {tuple(p.down.shape)} B {tuple(p.up.shape)} vs weight {tuple(modules[m].weight.shape)}"
              for m, p in pairs.items() if m not in absent and (
                  p.down.shape[0] != p.up.shape[1] or (p.up.shape[0], p.down.shape[1]) != tuple(modules[m].weight.shape))]
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise CheckpointError(f"lora {path} does not fit the base model: " + "; ".join(problems))
    default_alpha = config.get("lora_alpha", alpha)
    ranks = set()
    for name, pair in pairs.items():
        weight = modules[name].weight
        rank = pair.down.shape[0]
        ranks.add(rank)
        a = pair.alpha if pair.alpha is not None else default_alpha
        scale = strength * (a / rank if a is not None else 1.0)
        delta = pair.up.to(weight.device, torch.float32) @ pair.down.to(weight.device, torch.float32)
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
    return {"modules": len(pairs), "rank": max(ranks) if ranks else 0}
