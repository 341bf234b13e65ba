"""Models: the causal audio DiT, its attention and RoPE, audio/text encoders, VAEs, checkpoint formats."""
from .config import DiTConfig
from .dit import AvatarDiT
from .presets import from_preset, preset_config, preset_names

__all__ = ["AvatarDiT", "DiTConfig", "from_preset", "preset_config", "preset_names"]
