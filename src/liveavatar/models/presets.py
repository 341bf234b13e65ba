"""Model presets by name (``conf/model/<name>.yaml``, the files ``model=<name>`` picks in every CLI), for code that
is not under Hydra: :func:`from_preset` builds a preset's DiT, on the meta device by default, so that its size can
be checked without its memory."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from .config import DiTConfig
from .dit import AvatarDiT

PRESETS = Path(__file__).resolve().parents[3] / "conf" / "model"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_config(name: str) -> dict:
    """The whole preset ``name`` as a plain dict (``dit``, ``resolution``, ``vae``, ...)."""
    return OmegaConf.to_container(_load(name), resolve=True)


def _load(name: str):
    """A preset with its ``defaults`` (other presets it extends, as Hydra composes them) merged under it."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model preset {name!r} not found; presets: {', '.join(preset_names())}")
    own = OmegaConf.load(path)
    bases = [_load(str(base)) for base in own.pop("defaults", []) if base != "_self_"]
    return OmegaConf.merge(*bases, own)


def from_preset(name: str, device: str | torch.device = "meta", **overrides) -> AvatarDiT:
    """The DiT of preset ``name`` (``overrides`` replace :class:`DiTConfig` fields), built directly on ``device``
    (``meta``: shapes only, no memory)."""
    dit = {**preset_config(name)["dit"], **overrides}
    with torch.device(device):
        return AvatarDiT(DiTConfig.from_dict(dit))
