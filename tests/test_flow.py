import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from liveavatar.diffusion.flow import FlowSchedule, expand_like


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("steps", [1, 3, 4, 20, 50])
def test_inference_sigmas_match_diffusers(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ours = FlowSchedule(shift=shift).inference_sigmas(steps)
    torch.testing.assert_close(ours, ref.sigmas.float(), rtol=1e-6, atol=1e-7)


def test_training_table_matches_diffusers_training_sigmas():
    # diffusers' training table is indexed 1..1000 (1000 first); ours 1000..1 over the same shifted levels.
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    ours = FlowSchedule(shift=5.0)
    torch.testing.assert_close(ours.table.float(), ref.sigmas.float(), rtol=1e-6, atol=1e-7)


def test_warp_few_step_list():
    warped = FlowSchedule(shift=5.0).warp([1000, 750, 500, 250])
    # k s / (1 + (k - 1) s) at s = 1, .75, .5, .25 with k = 5
    expected = torch.tensor([1000.0, 937.5, 833.3333, 625.0])
    torch.testing.assert_close(warped, expected, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="denoising steps"):
        FlowSchedule().warp([1200])


def test_noise_velocity_roundtrip_per_frame_timesteps():
    flow = FlowSchedule(shift=5.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 5, 6, generator=g)
    noise = torch.randn(2, 4, 3, 5, 6, generator=g)
    t = torch.tensor([[999.0, 500.0, 10.0], [250.0, 1.0, 700.0]])
    xt = flow.add_noise(x0, noise, t)
    s = t[0, 1] / 1000
    torch.testing.assert_close(xt[0, :, 1], (1 - s) * x0[0, :, 1] + s * noise[0, :, 1])
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(xt, v, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow.velocity_from_x0(xt, x0, t), v, rtol=1e-3, atol=1e-3)


def test_sample_timesteps_ranges_and_distributions():
    flow = FlowSchedule(shift=5.0)
    g = torch.Generator().manual_seed(0)
    uniform = flow.sample_timesteps((4000,), generator=g)
    assert uniform.min() > 0 and uniform.max() <= 1000
    # shift 5 pushes mass to high noise: the median of the shifted uniform table is 1000 * 5*.5/(1+4*.5).
    assert abs(uniform.median().item() - 833.3) < 15
    ln = flow.sample_timesteps((4000,), generator=g, distribution="logit_normal")
    assert 0 < ln.min() and ln.max() < 1000
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        flow.sample_timesteps((2,), distribution="cosine")


def test_training_weight_is_a_normalised_bell():
    flow = FlowSchedule(shift=5.0)
    w = flow.training_weight(flow.timesteps)
    assert abs(w.mean().item() - 1.0) < 1e-9
    assert w[flow.timesteps.sub(500).abs().argmin()] == w.max()


def test_expand_like_rejects_bad_shapes():
    with pytest.raises(ValueError):
        expand_like(torch.zeros(2, 3, 4), torch.zeros(2, 1, 3, 1, 1))
