"""FVD's features: an I3D network from a local TorchScript file (the one FVD implementations share, StyleGAN-V's
``i3d_torchscript.pt``), applied to clips ``[N, 3, T, 224, 224]`` in [-1, 1] with ``rescale=False, resize=False,
return_features=True`` (the clips are resized here; the 400 logits before the softmax are the features). The call's
keyword arguments are configurable for other exports. FVD is then :func:`~liveavatar.metrics.frechet.frechet_from_features`
of generated against real clips' features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .frames import as_video
from .weights import require_path

SIZE = 224
CLIP_FRAMES = 16       # the usual FVD clip length
CALL_KWARGS = {"rescale": False, "resize": False, "return_features": True}


class I3DFeatures:
    """A loaded TorchScript I3D."""

    def __init__(self, module, call_kwargs: dict | None = None, frames: int = CLIP_FRAMES):
        self.module = module.eval()
        self.call_kwargs = dict(CALL_KWARGS if call_kwargs is None else call_kwargs)
        self.frames = int(frames)

    @classmethod
    def from_file(cls, path, key: str = "metrics.i3d", **kwargs) -> "I3DFeatures":
        file = require_path("FVD", key, path, "an I3D TorchScript, e.g. i3d_torchscript.pt (StyleGAN-V)")
        return cls(torch.jit.load(str(file), map_location="cpu"), **kwargs)

    def clip(self, video) -> torch.Tensor:
        """The first ``frames`` frames of ``video`` ``[3, T, H, W]`` in [-1, 1], resized: ``[1, 3, frames, 224, 224]``
        (a shorter video repeats its last frame)."""
        v = as_video(video).float()
        t = v.shape[1]
        idx = torch.arange(self.frames).clamp(max=t - 1)
        v = v[:, idx].transpose(0, 1)                                        # [frames, 3, H, W]
        v = F.interpolate(v, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(-1, 1)
        return v.transpose(0, 1)[None]

    @torch.no_grad()
    def __call__(self, videos: list) -> torch.Tensor:
        """``[N, D]`` float64 features of a list of videos."""
        return torch.cat([self.module(self.clip(v), **self.call_kwargs).double() for v in videos])
