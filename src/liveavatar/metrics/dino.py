"""Dino-S (Live Avatar's identity measure): the cosine similarity of each generated frame's DINOv2 embedding to the
reference image's, through ``transformers``' ``Dinov2Model`` loaded from a local folder (e.g. a copy of
``facebook/dinov2-base``). The embedding is the pooled output (the final layer-normed CLS token)."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from .frames import as_video
from .weights import require_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoSimilarity:
    """A loaded DINOv2 and its input preprocessing (resize to ``size``, ImageNet normalisation)."""

    def __init__(self, model, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model, self.size = model.eval(), int(size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, folder, key: str = "metrics.dino") -> "DinoSimilarity":
        """From a local ``Dinov2Model`` folder; its ``preprocessor_config.json`` (when present) gives the crop size
        and normalisation, otherwise the model's ``image_size`` and ImageNet statistics."""
        from transformers import Dinov2Model

        path = require_path("Dino-S", key, folder, "a DINOv2 model folder, e.g. facebook/dinov2-base")
        model = Dinov2Model.from_pretrained(path)
        size, mean, std = model.config.image_size, IMAGENET_MEAN, IMAGENET_STD
        pre = path / "preprocessor_config.json"
        if pre.exists():
            p = json.loads(pre.read_text())
            crop = p.get("crop_size") or {}
            size = crop.get("height", size) if isinstance(crop, dict) else crop
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        return cls(model, size, mean, std)

    @torch.no_grad()
    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T, D]`` embeddings of frames ``[T, 3, H, W]`` in [-1, 1]."""
        x = F.interpolate(frames.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        return self.model(pixel_values=x).pooler_output

    def score(self, video, reference, batch: int = 16) -> torch.Tensor:
        """Per-frame cosine similarity ``[T]`` of ``video`` ``[3, T, H, W]`` to ``reference`` ``[3, H, W]``."""
        frames = as_video(video).float().transpose(0, 1)
        ref = self.embed(as_video(reference).float().transpose(0, 1))
        out = [F.cosine_similarity(self.embed(frames[i : i + batch]), ref) for i in range(0, len(frames), batch)]
        return torch.cat(out)
