"""The Frechet distance between two Gaussians fitted to feature sets: FID on InceptionV3 pool features and FVD on
I3D features both use it. float64; the matrix square root is taken of the symmetric ``sqrt(S1) S2 sqrt(S1)``,
whose trace equals that of ``sqrtm(S1 S2)``, by eigendecomposition (no scipy)."""
from __future__ import annotations

import torch


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``."""
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    root = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def gaussian(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased) of features ``[N, D]``."""
    f = torch.as_tensor(features).double()
    return f.mean(0), torch.cov(f.T)


def frechet_from_features(a, b) -> float:
    """The Frechet distance between feature sets ``a [N, D]`` and ``b [M, D]``."""
    return frechet_distance(*gaussian(a), *gaussian(b))
