"""IQA and ASE (Live Avatar's and StreamAvatar's image quality and aesthetics scores): Q-Align, a multimodal
LLM (``q-future/one-align``, about 8B parameters) that rates an image on five levels; its score (1 to 5) is the
expectation of the level words under the model. A GPU metric, never in CI: the model loads from a local folder
through transformers with its own remote code (``trust_remote_code``), whose ``score(images, task_, input_)`` this
module calls on evenly spread frames of a video and averages.
"""
from __future__ import annotations

import numpy as np
import torch

from .frames import as_video
from .weights import MissingWeights, require_path

TASKS = {"iqa": "quality", "ase": "aesthetics"}   # our metric names -> Q-Align's task names


class QAlign:
    """A loaded Q-Align model (anything with Q-Align's ``score`` method) scoring ``frames`` frames per video."""

    def __init__(self, model, frames: int = 8):
        self.model, self.frames = model, int(frames)

    @classmethod
    def from_pretrained(cls, path, key: str = "metrics.qalign", device: str | None = None, **kwargs) -> "QAlign":
        folder = require_path("IQA/ASE (Q-Align)", key, path, "the q-future/one-align model folder")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(folder), trust_remote_code=True, local_files_only=True,
                torch_dtype=torch.float16 if device.startswith("cuda") else torch.float32).to(device).eval()
        except Exception as err:  # remote code: any failure is reported in one line, and the other metrics run
            line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MissingWeights(f"IQA/ASE (Q-Align): {key}={folder} did not load: {line}") from err
        return cls(model, **kwargs)

    def images(self, video) -> list:
        """``frames`` evenly spread frames of ``video`` ``[3, T, H, W]`` in [-1, 1], as RGB PIL images."""
        from PIL import Image

        v = as_video(video)
        t = v.shape[1]
        idx = np.linspace(0, t - 1, min(t, self.frames)).round().astype(int)
        pixels = ((v[:, idx].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        return [Image.fromarray(p) for p in pixels]

    @torch.no_grad()
    def __call__(self, video) -> dict[str, float]:
        """``{"iqa": ..., "ase": ...}``: the mean Q-Align quality and aesthetics scores (1 to 5) of the frames."""
        images = self.images(video)
        return {name: float(torch.as_tensor(self.model.score(images, task_=task, input_="image")).float().mean())
                for name, task in TASKS.items()}
