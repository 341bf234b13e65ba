"""Video VAEs: Wan's causal 3D VAE (with a chunk-by-chunk streaming decoder) and an exact toy "VAE".

All tensors are ``[B, C, T, H, W]``. Pixels are in ``[-1, 1]``. Latents are *normalized*: what the DiT sees and
predicts, i.e. ``(mu - latents_mean) / latents_std`` for Wan (per channel, from the VAE config).

* :class:`WanVAE` wraps diffusers' ``AutoencoderKLWan`` (Wan2.1: 16 channels, 4x time, 8x space; Wan2.2 TI2V:
  48 channels, 4x time, 16x space). Video frames ``T = 1 + 4 (F - 1)`` <-> latent frames ``F``: the first latent
  frame holds the first video frame alone, every later one holds 4 video frames.
* :class:`StreamingDecoder` decodes consecutive latent chunks of one video while keeping the decoder's causal
  convolution cache, so the concatenated output equals one full decode of the concatenated latents.
* :class:`PatchVAE` is the toy world's VAE: an exactly invertible space-to-depth, no time compression.
* :func:`build_vae` builds either from a config.

The streaming decoder drives ``AutoencoderKLWan.decoder`` the way ``AutoencoderKLWan._decode`` does in diffusers
0.42.1 (pinned in pyproject.toml): the feature-cache protocol (``feat_cache`` list / ``feat_idx`` counter /
``first_chunk``) is private to diffusers and may change between releases.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["WanVAE", "StreamingDecoder", "PatchVAE", "PatchStreamingDecoder", "build_vae"]


def _latent_frames(video_frames: int, time_factor: int) -> int:
    """Latent frames for ``video_frames`` of a causal VAE (first frame alone, then ``time_factor`` each)."""
    if video_frames < 0:
        raise ValueError(f"video_frames must be >= 0, got {video_frames}")
    return 1 + math.ceil((video_frames - 1) / time_factor) if video_frames else 0


def _video_frames(latent_frames: int, time_factor: int) -> int:
    """Video frames decoded from ``latent_frames`` of a causal VAE: ``1 + time_factor * (F - 1)``."""
    if latent_frames < 0:
        raise ValueError(f"latent_frames must be >= 0, got {latent_frames}")
    return 1 + time_factor * (latent_frames - 1) if latent_frames else 0


def _check_5d(x: torch.Tensor, name: str, channels: int | None = None) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------------------
# Wan
# --------------------------------------------------------------------------------------------------------------


class WanVAE:
    """Wan's causal video VAE (diffusers ``AutoencoderKLWan``) with latent normalization.

    The wrapped model is frozen (``eval()``, ``requires_grad_(False)``): no autograd graph is built unless the
    inputs require grad, so gradients w.r.t. latents (e.g. pixel losses) still flow through :meth:`decode`.

    Args:
        model: an ``AutoencoderKLWan``. Its config supplies ``latents_mean`` / ``latents_std`` (one per latent
            channel); if both are missing the normalization is the identity.
    """

    def __init__(self, model):
        from diffusers import AutoencoderKLWan

        if not isinstance(model, AutoencoderKLWan):
            raise TypeError(f"WanVAE wraps a diffusers AutoencoderKLWan, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        z = int(cfg.z_dim)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None and std is None:
            mean, std = [0.0] * z, [1.0] * z
        if mean is None or std is None or len(mean) != z or len(std) != z:
            raise ValueError(
                f"VAE config latents_mean/latents_std must both have z_dim={z} entries, "
                f"got {None if mean is None else len(mean)} and {None if std is None else len(std)}"
            )
        # Kept in float32 on the CPU; moved/cast per call so normalization never runs in bf16.
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> "WanVAE":
        """Load a local diffusers-format ``AutoencoderKLWan`` folder (``config.json`` + weights), offline.

        ``path`` may also be a diffusers pipeline folder whose ``vae/`` subfolder holds the VAE.
        """
        from diffusers import AutoencoderKLWan

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"VAE path {path!r} is not a directory (expected a diffusers AutoencoderKLWan folder)"
            )
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "vae", "config.json")
        ):
            path = os.path.join(path, "vae")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"{path!r} is not a diffusers VAE folder: no config.json")
        try:
            with open(config_file) as f:
                class_name = json.load(f).get("_class_name")
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_file!r} is not a readable JSON VAE config: {e}") from e
        if class_name != "AutoencoderKLWan":
            raise ValueError(f"{path!r} is not an AutoencoderKLWan folder (config _class_name is {class_name!r})")
        try:
            model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except OSError as e:  # diffusers raises OSError/EnvironmentError for missing weight files
            raise ValueError(f"could not load the AutoencoderKLWan weights from {path!r}: {e}") from e
        return cls(model.to(device))

    # ---- geometry ---------------------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.z_dim)

    @property
    def time_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan): 2 per temporal downsample stage."""
        return 2 ** sum(bool(t) for t in self._temporal_downsample)

    @property
    def space_factor(self) -> int:
        """Pixels per latent along H and W: 2 per encoder downsample stage, times the patchify size (Wan2.2)."""
        patch = self.model.config.patch_size or 1
        return 2 ** len(self._temporal_downsample) * int(patch)

    @property
    def _temporal_downsample(self) -> list[bool]:
        # The encoder downsamples (in space) once per dim_mult entry but the last; temperal_downsample[i] says
        # whether stage i also halves time. Entries beyond len(dim_mult) - 1 are never used by diffusers.
        cfg = self.model.config
        return list(cfg.temperal_downsample)[: len(cfg.dim_mult) - 1]

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames for ``video_frames`` (``1 + ceil((T - 1) / time_factor)``; 0 for 0)."""
        return _latent_frames(video_frames, self.time_factor)

    def video_frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` (``1 + time_factor * (F - 1)``; 0 for 0)."""
        return _video_frames(latent_frames, self.time_factor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device=None, dtype=None) -> "WanVAE":
        self.model.to(device=device, dtype=dtype)
        return self

    # ---- normalization ----------------------------------------------------------------------------------------

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean ``[B, C, F, h, w]`` -> normalized latents (float32 math, input dtype out)."""
        mean, std = self._stats(mu.device)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std on ``device``, copied there once (not on every chunk of a stream)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self._mean.to(device), self._std.to(device))
        return self._on_device[key]

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> raw VAE latents ``z = latents * std + mean``, in the VAE's dtype."""
        mean, std = self._stats(latents.device)
        return (latents.float() * std + mean).to(device=self.device, dtype=self.dtype)

    # ---- encode / decode --------------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, 3, T, H, W]`` in [-1, 1] -> normalized latents (posterior mean) ``[B, C, F, h, w]``.

        ``T`` must be ``1 + time_factor * k`` (diffusers encodes the first frame alone, then 4 at a time, and
        silently drops leftovers) and ``H``, ``W`` multiples of ``space_factor``. Output is in the VAE's dtype.
        """
        _check_5d(video, "video", int(self.model.config.in_channels) // (self.model.config.patch_size or 1) ** 2)
        _, _, t, h, w = video.shape
        if t < 1 or (t - 1) % self.time_factor:
            raise ValueError(f"video frames must be 1 + {self.time_factor} * k, got {t}")
        if h % self.space_factor or w % self.space_factor:
            raise ValueError(f"video height/width {h}x{w} must be multiples of {self.space_factor}")
        video = video.to(device=self.device, dtype=self.dtype)
        mu = self.model.encode(video).latent_dist.mean  # deterministic: the posterior mean, no sampling
        return self.normalize(mu)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[B, C, F, h, w]`` -> video ``[B, 3, 1 + time_factor (F - 1), H, W]`` in [-1, 1].

        Runs the same per-latent-frame path as :class:`StreamingDecoder` (a fresh one, all frames as one chunk),
        so any chunked streaming decode equals this bit for bit. It matches diffusers' ``AutoencoderKLWan.decode``
        up to float rounding (that applies ``post_quant_conv`` to all frames at once) and ignores its tiling.
        """
        return StreamingDecoder(self).decode(latents)

    def stream_decoder(self) -> "StreamingDecoder":
        """A fresh :class:`StreamingDecoder` for one video (call its ``reset()`` to start another)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes one video's latents chunk by chunk, carrying Wan's causal-conv feature cache between chunks.

    ``decode(chunk)`` takes normalized latents ``[B, C, n, h, w]`` (any ``n >= 1``; consecutive chunks of the
    same video, same batch) and returns the video frames they produce: ``1 + time_factor (n - 1)`` for the first
    chunk, ``time_factor * n`` after. Concatenating the outputs along T equals :meth:`WanVAE.decode` of the
    concatenated latents bit for bit: both walk latent frames one at a time through this cache, exactly as
    diffusers' ``AutoencoderKLWan._decode`` does.

    The cache is owned by this object (not the model's ``_feat_map``), so several streams can share one VAE and
    a full ``WanVAE.decode`` in between does not disturb them. Spatial tiling (``enable_tiling``) is not used.
    """

    def __init__(self, vae: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.vae = vae
        # One cache slot per causal conv of the decoder: the same count diffusers' clear_cache() allocates.
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.model.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Forget the previous video: the next chunk is decoded as the start of a new one."""
        self._feat_map: list[Any] = [None] * self._num_convs
        self._frames_done = 0  # latent frames decoded so far in this video

    @property
    def latent_frames_done(self) -> int:
        return self._frames_done

    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[B, C, n, h, w]`` -> this chunk's video frames ``[B, 3, T_n, H, W]`` in [-1, 1]."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae, model = self.vae, self.vae.model
        _check_5d(chunk, "latent chunk", vae.latent_channels)
        if chunk.shape[2] < 1:
            raise ValueError("latent chunk must hold at least one latent frame")
        z = vae.denormalize(chunk)
        outs = []
        for i in range(z.shape[2]):
            # post_quant_conv is a 1x1x1 conv (no temporal context). diffusers applies it to the whole latent
            # video at once; we apply it per latent frame because CPU conv kernels round differently for T=1
            # and T>1 (~6e-8), and per frame the result cannot depend on how the video was chunked.
            x = model.post_quant_conv(z[:, :, i : i + 1])
            # As in AutoencoderKLWan._decode: fresh conv index per latent frame, one shared cache, and
            # first_chunk=True only for the video's very first latent frame (Wan2.2's DupUp3D drops the
            # padded leading frames there; Wan2.1's up blocks rely on the "Rep" cache marker instead).
            conv_idx = [0]
            outs.append(
                model.decoder(x, feat_cache=self._feat_map, feat_idx=conv_idx, first_chunk=self._frames_done == 0)
            )
            self._frames_done += 1
        out = torch.cat(outs, dim=2)
        if model.config.patch_size is not None:
            out = unpatchify(out, patch_size=model.config.patch_size)  # per-frame depth-to-space (Wan2.2)
        return torch.clamp(out, min=-1.0, max=1.0)  # elementwise, as in _decode: same result per chunk


# --------------------------------------------------------------------------------------------------------------
# Toy: exact space-to-depth
# --------------------------------------------------------------------------------------------------------------


class PatchVAE:
    """The toy world's exactly invertible "VAE": per-frame space-to-depth, no time compression.

    ``encode``: video ``[B, c, T, H, W]`` -> latents ``[B, c f^2, T, H/f, W/f]`` with ``latent = (pixel_unshuffle(
    video) - shift) / scale``; ``decode`` inverts it (``pixel_shuffle(latent * scale + shift)``, then clamped to
    [-1, 1] like Wan unless ``clamp=False``). With the default ``shift=0, scale=1`` (or any power-of-two scale)
    the round trip of a video in [-1, 1] is bit-exact.
    """

    def __init__(
        self,
        space_factor: int = 2,
        channels: int = 3,
        shift: float = 0.0,
        scale: float = 1.0,
        clamp: bool = True,
    ):
        if int(space_factor) < 1:
            raise ValueError(f"space_factor must be >= 1, got {space_factor}")
        if scale == 0:
            raise ValueError("scale must be non-zero")
        self._space_factor = int(space_factor)
        self.channels = int(channels)
        self.shift = float(shift)
        self.scale = float(scale)
        self.clamp = bool(clamp)

    @property
    def latent_channels(self) -> int:
        return self.channels * self._space_factor**2

    @property
    def time_factor(self) -> int:
        return 1

    @property
    def space_factor(self) -> int:
        return self._space_factor

    def latent_frames(self, video_frames: int) -> int:
        return _latent_frames(video_frames, 1)

    def video_frames(self, latent_frames: int) -> int:
        return _video_frames(latent_frames, 1)

    def to(self, device=None, dtype=None) -> "PatchVAE":  # parameter-free: nothing to move
        return self

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, c, T, H, W]`` -> latents ``[B, c f^2, T, H/f, W/f]`` (same dtype and device)."""
        _check_5d(video, "video", self.channels)
        b, c, t, h, w = video.shape
        f = self._space_factor
        if h % f or w % f:
            raise ValueError(f"video height/width {h}x{w} must be multiples of space_factor {f}")
        # pixel_unshuffle works on [N, C, H, W]: fold time into the batch.
        x = video.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.pixel_unshuffle(x, f)
        x = x.reshape(b, t, c * f * f, h // f, w // f).transpose(1, 2)
        return (x - self.shift) / self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, c f^2, T, h, w]`` -> video ``[B, c, T, h f, w f]``."""
        _check_5d(latents, "latents", self.latent_channels)
        b, cl, t, h, w = latents.shape
        f = self._space_factor
        x = latents * self.scale + self.shift
        x = x.transpose(1, 2).reshape(b * t, cl, h, w)
        x = F.pixel_shuffle(x, f)
        x = x.reshape(b, t, self.channels, h * f, w * f).transpose(1, 2)
        return x.clamp(-1.0, 1.0) if self.clamp else x

    def stream_decoder(self) -> "PatchStreamingDecoder":
        return PatchStreamingDecoder(self)


class PatchStreamingDecoder:
    """:class:`StreamingDecoder` interface for :class:`PatchVAE`: frames are independent, each chunk decodes alone."""

    def __init__(self, vae: PatchVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self._frames_done = 0

    @property
    def latent_frames_done(self) -> int:
        return self._frames_done

    def decode(self, chunk: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(chunk)
        self._frames_done += chunk.shape[2]
        return out


# --------------------------------------------------------------------------------------------------------------
# Config entry point
# --------------------------------------------------------------------------------------------------------------


def build_vae(kind: str, path: str | None = None, **kwargs) -> WanVAE | PatchVAE:
    """Build a VAE from a config: ``kind="wan"`` loads :class:`WanVAE` from ``path`` (kwargs: ``dtype`` (a
    ``torch.dtype`` or a name such as ``"bfloat16"``), ``device``); ``kind="patch"`` builds :class:`PatchVAE`
    (kwargs: ``space_factor``, ``channels``, ``shift``, ``scale``, ``clamp``; ``path`` is ignored)."""
    kind = str(kind).lower()
    if kind == "wan":
        if not path:
            raise ValueError("vae kind 'wan' needs a path to a diffusers AutoencoderKLWan folder")
        dtype = kwargs.pop("dtype", torch.float32)
        if isinstance(dtype, str):  # configs spell dtypes as strings
            name, dtype = dtype, getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {name!r}")
        device = kwargs.pop("device", "cpu")
        if kwargs:
            raise TypeError(f"unexpected arguments for vae kind 'wan': {sorted(kwargs)}")
        return WanVAE.from_pretrained(path, dtype=dtype, device=device)
    if kind == "patch":
        return PatchVAE(**kwargs)
    raise ValueError(f"unknown vae kind {kind!r}: expected 'wan' or 'patch'")
