"""The DiT's configuration: one dataclass, read from Hydra's ``model`` group or a checkpoint's config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

REFERENCE_MODES = ("none", "sink", "concat", "first_frame")
FAMILIES = ("wan", "s2v")
# The original S2V audio encoder mixes every hidden state of wav2vec2-large: its 24 layers' and the input's.
ORIGINAL_S2V_AUDIO_LAYERS = 24 + 1


@dataclass
class DiTConfig:
    """Architecture of :class:`~liveavatar.models.dit.AvatarDiT`.

    The first block of fields is Wan2.1's ``WanModel`` config (same names, so a Wan2.1 ``config.json`` reads
    directly). The rest are this project's additions; zero or ``"none"`` turns them off. ``family="s2v"`` swaps the
    audio modules for Wan2.2-S2V's (:mod:`liveavatar.models.s2v`; an original S2V ``config.json`` reads through
    :meth:`from_dict`).
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
    # (a zero-initialised second patch embedding: the same as Wan's i2v channel concatenation), "first_frame"
    # replaces the clip's first latent frame by it at timestep 0 (Wan2.2-TI2V's text-image-to-video), "none".
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
    # How audio_proj normalises each frame's features before its MLP: "layer" (a LayerNorm over the feature axis,
    # for learned encoder states such as wav2vec2's) or "none" (features already on a fixed scale whose level is
    # the information: a LayerNorm removes the common offset of log energies, i.e. the loudness).
    audio_feature_norm: str = "layer"
    # Also add each latent frame's audio (mean of its tokens, through a zero-initialised linear map) to that
    # frame's time embedding, so audio modulates every block's norms and gates per frame (adaptive norm).
    audio_modulation: bool = False
    video_frames_per_latent: int = 4
    # Talking and listening (StreamAvatar): the features carry two streams stacked on the layer axis,
    # [B, V, 2 * audio_layers_in, feat]: the avatar's own voice masked to its speaking frames, then the
    # interlocutor's masked to its listening frames (models/interaction.py). Each stream has its projection; the
    # audio blocks attend to the talking tokens (audio_attn) and, through interact_audio_attn, to the listening ones.
    listening: bool = False

    # Model family: "wan" (Wan2.1-style blocks: T2V, TI2V; audio through audio_proj and per-block audio_attn) or
    # "s2v" (Wan2.2-S2V: audio through casual_audio_encoder and audio_injector after the audio_blocks, the
    # reference as zero-timestep sink tokens, a token-type embedding, a pose condition and FramePack motion).
    family: str = "wan"
    # s2v: local audio tokens per latent frame (plus one learned padding token), and whether the audio injection
    # normalises the video tokens adaptively from a global audio embedding (the original's enable_adain).
    audio_tokens: int = 4
    audio_adaptive_norm: bool = False
    # s2v: channels of the pose condition latent patch-embedded onto the clip tokens (0: none).
    cond_dim: int = 0
    # s2v: FramePack encoding of clean motion latents before the clip (frame_packer), and its drop mode.
    framepack: bool = False
    framepack_drop_mode: str = "padd"
    # s2v: video frames of motion context the original places before a clip; its audio encoder sees that many
    # copies of the first audio frame before the clip's audio (the original's motion_frames[0]).
    motion_video_frames: int = 73

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.audio_blocks = [int(b) for b in self.audio_blocks]
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "s2v":
            if self.reference != "sink":
                raise ValueError("the s2v family takes the reference as sink tokens (model.reference=sink)")
            if self.audio_dim not in (0, self.dim):
                raise ValueError(f"s2v audio tokens have the model width: model.audio_dim must be {self.dim}")
            self.audio_dim = self.dim
            if self.video_frames_per_latent != 4:
                raise ValueError("the s2v audio encoder downsamples 4x in time: model.video_frames_per_latent must be 4")
            if self.motion_video_frames % self.video_frames_per_latent != 1:
                raise ValueError("model.motion_video_frames must be 1 + a multiple of video_frames_per_latent")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"model.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim {self.dim} is not divisible by model.num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dimension {self.dim // self.num_heads} must be even for RoPE")
        bad = [b for b in self.audio_blocks if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"model.audio_blocks {bad} are outside 0..{self.num_layers - 1}")
        if self.audio_feature_norm not in ("layer", "none"):
            raise ValueError(f"model.audio_feature_norm must be 'layer' or 'none', got {self.audio_feature_norm!r}")
        if self.audio_dim and not self.audio_blocks:
            raise ValueError("model.audio_dim > 0 needs at least one entry in model.audio_blocks")
        if self.listening and (self.family != "wan" or not self.audio_dim):
            raise ValueError("model.listening adds interact-audio attention to the wan family's audio blocks: it needs "
                             "family=wan and model.audio_dim > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_audio(self) -> bool:
        return self.audio_dim > 0

    @property
    def audio_streams(self) -> int:
        """Audio streams stacked on the features' layer axis: 2 (talking, listening) for a listening model."""
        return 2 if self.listening else 1

    @property
    def feature_layers(self) -> int:
        """Layers on the features' layer axis: ``audio_layers_in`` per stream."""
        return self.audio_layers_in * self.audio_streams

    @property
    def motion_latent_frames(self) -> int:
        """s2v: latent frames of :attr:`motion_video_frames` (the first alone, then ``video_frames_per_latent``)."""
        return 1 + (self.motion_video_frames - 1) // self.video_frames_per_latent

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        """Build from a dict, ignoring keys that are not fields (``_class_name``, ...). An original Wan2.2-S2V
        config (``model_type: s2v``) is translated to this project's field names."""
        if values.get("model_type") == "s2v" and "family" not in values:
            values = s2v_fields(values)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


def s2v_fields(values: dict[str, Any]) -> dict[str, Any]:
    """An original ``WanModel_S2V`` config (Wan2.2 ``wan/modules/s2v/model_s2v.py`` arguments) -> DiTConfig fields.
    The original's ``audio_dim`` is the wav2vec2 width (ours: ``audio_feature_dim``); its reference sits at RoPE
    time position 30 whatever the clip; its audio encoder mixes all wav2vec2-large hidden states."""
    if values.get("enable_motioner"):
        raise ValueError("Wan2.2-S2V with the transformer motioner (enable_motioner) is not supported; "
                         "the released S2V-14B uses FramePack (enable_framepack)")
    if not values.get("zero_timestep", True):
        raise ValueError("Wan2.2-S2V without zero_timestep is not supported (the reference is a t=0 sink here)")
    if values.get("adain_mode", "attn_norm") != "attn_norm":
        raise ValueError(f"Wan2.2-S2V adain_mode {values['adain_mode']!r} is not supported (only attn_norm)")
    out = {k: v for k, v in values.items() if k not in ("audio_dim", "motion_frames")}
    motion = values.get("motion_frames", 73)
    out.update(
        family="s2v", reference="sink", reference_position=values.get("reference_position", 30),
        audio_dim=values.get("dim", 2048), audio_feature_dim=values.get("audio_dim", 5120),
        audio_layers_in=values.get("audio_layers_in", ORIGINAL_S2V_AUDIO_LAYERS),
        audio_blocks=list(values.get("audio_inject_layers", [0, 4, 8, 12, 16, 20, 24, 27])),
        audio_tokens=values.get("num_audio_token", 4), audio_adaptive_norm=bool(values.get("enable_adain", False)),
        cond_dim=values.get("cond_dim", 0), framepack=bool(values.get("enable_framepack", False)),
        framepack_drop_mode=values.get("framepack_drop_mode", "drop"),
        motion_video_frames=motion[0] if isinstance(motion, (list, tuple)) else motion,
    )
    return out


def s2v_original_config(cfg: DiTConfig) -> dict[str, Any]:
    """The inverse of :func:`s2v_fields`: the arguments of the original ``WanModel_S2V`` for ``cfg`` (written as
    config.json, so the original code can build the model of a checkpoint saved here)."""
    return {
        "_class_name": "WanModel_S2V", "model_type": "s2v", "patch_size": list(cfg.patch_size),
        "text_len": cfg.text_len, "in_dim": cfg.in_dim, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.out_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "qk_norm": cfg.qk_norm, "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps,
        "cond_dim": cfg.cond_dim, "audio_dim": cfg.audio_feature_dim, "num_audio_token": cfg.audio_tokens,
        "enable_adain": cfg.audio_adaptive_norm, "adain_mode": "attn_norm", "audio_inject_layers": cfg.audio_blocks,
        "zero_timestep": True, "enable_motioner": False, "enable_framepack": cfg.framepack,
        "framepack_drop_mode": cfg.framepack_drop_mode, "motion_frames": cfg.motion_video_frames,
        # the rest of the DiTConfig, so that a checkpoint written here reloads with nothing lost
        "frames_per_block": cfg.frames_per_block, "rope_theta": cfg.rope_theta, "audio_layers_in": cfg.audio_layers_in,
        "reference_position": cfg.reference_position,
    }
