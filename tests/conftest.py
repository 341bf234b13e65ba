from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from liveavatar.models import AvatarDiT, DiTConfig

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def tiny_config(**overrides) -> DiTConfig:
    values = dict(
        in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, text_len=8, num_heads=4, num_layers=2,
        frames_per_block=2, reference="none",
    )
    values.update(overrides)
    return DiTConfig(**values)


def randomise(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (a fresh Wan model has a zero head and predicts zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    def build(**overrides):
        torch.manual_seed(0)
        return randomise(AvatarDiT(tiny_config(**overrides))).eval()

    return build


def tiny_preset() -> DiTConfig:
    """The DiT of ``conf/model/tiny.yaml`` (the preset infer.py streams by default)."""
    return DiTConfig.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").dit))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny-preset model whose every parameter is random and non-zero, for ``checkpoint=``.

    A freshly built model has a zero output head, so it predicts a zero velocity and two engines that agree on
    it only agree on their noise; this one makes engine comparisons compare the model's computation. The small
    std keeps the streamed latents finite and the decoded frames away from 0 and 255.
    """
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    torch.manual_seed(0)
    randomise(AvatarDiT(tiny_preset()), std=0.05, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def autograd_stays_on():
    """Library entry points (inference, preprocessing, evaluation) run without gradients inside their own call;
    none may switch autograd off for the whole process (the training code run after them would silently get no
    gradients)."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd switched off for the whole process")
