import pytest
import torch

from liveavatar.models import AvatarDiT, DiTConfig

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
