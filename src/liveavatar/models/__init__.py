"""Models: the causal audio DiT, its attention and RoPE, audio/text encoders, VAEs, checkpoint formats."""
from .config import DiTConfig
from .dit import AvatarDiT

__all__ = ["AvatarDiT", "DiTConfig"]
