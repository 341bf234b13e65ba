"""The DiT's configuration: one dataclass, read from Hydra's ``model`` group or a checkpoint's config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

REFERENCE_MODES = ("none", "sink", "concat")


@dataclass
class DiTConfig:
    """Architecture of :class:`~liveavatar.models.dit.AvatarDiT`.

    The first block of fields is Wan2.1's ``WanModel`` config (same names, so a Wan2.1 ``config.json`` reads
    directly). The rest are this project's additions; zero or ``"none"`` turns them off.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    # Streaming: latent frames per causal block (attention is bidirectional inside a block, causal between).
    frames_per_block: int = 3
    # Reference image conditioning: "sink" prepends its tokens, "concat" adds it on channels to every frame
    # (a zero-initialised second patch embedding: the same as Wan's i2v channel concatenation), "none".
    reference: str = "sink"
    # Where training puts the reference's RoPE time position, relative to a clip's first frame (-1: just before
    # it). Position policies (engine, Stage 1/2 training) keep offsets relative to it.
    reference_position: int = -1
    # Audio: features [B, video_frames, audio_layers_in, audio_feature_dim] from an audio encoder, grouped
    # by latent frame (video_frames_per_latent video frames each, the first latent frame alone), projected to
    # audio_dim and attended by the blocks listed in audio_blocks. audio_dim = 0 disables audio.
    audio_dim: int = 0
    audio_feature_dim: int = 768
    audio_layers_in: int = 1
    audio_blocks: list[int] = field(default_factory=list)
    # Also add each latent frame's audio (mean of its tokens, through a zero-initialised linear map) to that
    # frame's time embedding, so audio modulates every block's norms and gates per frame (adaptive norm).
    audio_modulation: bool = False
    video_frames_per_latent: int = 4

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.audio_blocks = [int(b) for b in self.audio_blocks]
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"model.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim {self.dim} is not divisible by model.num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dimension {self.dim // self.num_heads} must be even for RoPE")
        bad = [b for b in self.audio_blocks if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"model.audio_blocks {bad} are outside 0..{self.num_layers - 1}")
        if self.audio_dim and not self.audio_blocks:
            raise ValueError("model.audio_dim > 0 needs at least one entry in model.audio_blocks")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_audio(self) -> bool:
        return self.audio_dim > 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        """Build from a dict, ignoring keys that are not fields (``_class_name``, ``model_type``, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out
