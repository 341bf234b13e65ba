"""GenBench's weight-free metrics against values known by construction: PSNR's closed form, SSIM of a video with
itself and its luminance term alone, T.Flicker of static and alternating videos, colour and histogram drift,
Laplacian sharpness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liveavatar.metrics import colour_drift, histogram_drift, psnr, sharpness, ssim, temporal_flicker, trend


def noise_video(t=4, h=24, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 1.6 - 0.8


def test_psnr_matches_its_closed_form_and_caps_identical_frames():
    v = noise_video()
    assert psnr(v, v).tolist() == [100.0] * 4
    shifted = v + 0.1
    expected = 10 * math.log10(2.0**2 / 0.1**2)
    assert psnr(shifted, v).numpy() == pytest.approx([expected] * 4, rel=1e-6)  # float32 input
    assert psnr(v.numpy(), v[:, :2]).shape == (2,)   # over the frames both have, numpy accepted


def test_ssim_is_one_for_itself_falls_with_noise_and_matches_the_luminance_term():
    v = noise_video()
    assert ssim(v, v).numpy() == pytest.approx([1.0] * 4, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    scores = [float(ssim(v + s * torch.randn(v.shape, generator=g), v).mean()) for s in (0.05, 0.2, 0.5)]
    assert scores[0] > scores[1] > scores[2]
    # Two flat frames: variances and covariance vanish, so SSIM is the luminance term alone.
    a, b = torch.full((3, 1, 16, 16), 0.2), torch.full((3, 1, 16, 16), -0.3)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    luminance = (2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1)
    assert float(ssim(a, b)[0]) == pytest.approx(luminance, rel=1e-6)


def test_flicker_is_one_for_a_static_video_and_follows_the_frame_difference():
    still = noise_video(t=1).expand(3, 6, 24, 24)
    assert temporal_flicker(still) == 1.0
    d = 51  # on the 0..255 scale
    low, high = torch.full((3, 1, 8, 8), -1.0), torch.full((3, 1, 8, 8), -1.0 + d / 127.5)
    alternating = torch.cat([low, high, low, high], dim=1)
    assert temporal_flicker(alternating) == pytest.approx((255 - d) / 255, rel=1e-6)  # float32 input


def test_colour_and_histogram_drift_are_zero_for_the_reference_and_grow_away_from_it():
    reference = noise_video(t=1)[:, 0]
    same = reference[:, None].expand(3, 5, 24, 24)
    assert colour_drift(same, reference).abs().max() < 1e-12
    assert histogram_drift(same, reference).abs().max() < 1e-12
    shift = torch.tensor([0.1, -0.2, 0.05])
    moved = (same + shift[:, None, None, None])
    assert colour_drift(moved, reference).numpy() == pytest.approx([float(shift.norm())] * 5, rel=1e-6)
    dark, bright = torch.full((3, 1, 8, 8), -0.9), torch.full((3, 8, 8), 0.9)
    assert float(histogram_drift(dark, bright)[0]) == 1.0
    assert trend(torch.tensor([0.0, 0.0, 1.0, 1.0])) == 1.0


def test_sharpness_is_zero_when_flat_and_higher_for_a_sharper_image():
    assert float(sharpness(torch.zeros(3, 1, 16, 16))[0]) == 0.0
    checker = torch.tensor(np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0)
    sharp = checker[None, None].expand(3, 1, 16, 16).clone()
    blurred = torch.nn.functional.avg_pool2d(sharp[:, 0][None], 3, 1, 1)[0][:, None]
    assert float(sharpness(sharp)[0]) > 10 * float(sharpness(blurred)[0])
