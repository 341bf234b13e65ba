"""Diffusion Forcing trains with the window and the position policy the engine streams with."""
import pytest
import torch

from liveavatar.engine.positions import PositionPolicy
from liveavatar.models import AvatarDiT
from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss

from conftest import randomise, tiny_config
from naive_engine import paper_sink_position


@pytest.mark.parametrize("policy", ["absolute", "rolling", "rapr"])
def test_training_positions_place_each_clip_in_a_longer_stream(policy):
    p = PositionPolicy(policy, frames_per_block=2, window_frames=4, max_distance=6, train_shift=20)
    g = torch.Generator().manual_seed(0)
    frame_pos, sink = p.training_positions(64, 8, generator=g)
    starts = frame_pos[:, 0]
    assert starts.min() >= 0 and starts.max() <= 20 and len(set(starts.tolist())) > 5
    torch.testing.assert_close(frame_pos, starts[:, None] + torch.arange(8))
    for r, row in zip(starts.tolist(), sink.tolist()):
        assert row == [paper_sink_position(policy, r + 2 * j, -1, 2, 6) for j in range(4)]


def test_diffusion_forcing_attends_to_the_window_only():
    torch.manual_seed(0)
    # One layer: with more, information also travels through the history's own (windowed) attention, exactly as
    # the cache's keys carry it, so only the direct reach is the window.
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2, num_layers=1)), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 4, 4, generator=g)
    ctx, ref = torch.randn(1, 5, 32, generator=g), torch.randn(1, 4, 1, 4, 4, generator=g)
    t = torch.full((1, 8), 500.0)
    bumped = x.clone()
    bumped[:, :, :2] += 1.0  # block 0
    with torch.no_grad():
        for window, block3_sees_block0 in [(1, False), (2, False), (3, True), (None, True)]:
            a = model(x, t, ctx, causal=True, reference=ref, window_blocks=window)
            b = model(bumped, t, ctx, causal=True, reference=ref, window_blocks=window)
            changed = (a[:, :, 6:] - b[:, :, 6:]).abs().max() > 1e-4
            assert bool(changed) == block3_sees_block0, window
            assert (a[:, :, 2:4] - b[:, :, 2:4]).abs().max() > 1e-4  # block 1 always sees block 0


def test_the_loss_gives_the_model_the_engines_window_and_sink_positions():
    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1)
    calls = []
    real_forward = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_forward(*args, **kwargs)

    model.forward = spy
    policy = PositionPolicy("rapr", frames_per_block=2, window_frames=4, max_distance=5, train_shift=7)
    loss_fn = FlowMatchingLoss(FlowLossConfig(), causal=True, frames_per_block=2, positions=policy)
    g = torch.Generator().manual_seed(2)
    batch = {"latents": torch.randn(3, 4, 6, 4, 4, generator=g), "reference": torch.randn(3, 4, 1, 4, 4, generator=g),
             "text": torch.randn(3, 5, 32, generator=g)}
    loss, _ = loss_fn(model, batch, generator=torch.Generator().manual_seed(3))
    loss.backward()
    (kw,) = calls
    assert kw["window_blocks"] == 2 and kw["causal"]
    starts = kw["frame_pos"][:, 0].tolist()
    expected = [[[paper_sink_position("rapr", r + 2 * j, -1, 2, 5)] for j in range(3)] for r in starts]
    assert kw["reference_pos"].tolist() == expected
    assert all(p.grad is not None for p in model.blocks[0].self_attn.parameters())


def test_evicted_clips_start_the_stream_and_only_their_first_window_sees_the_sink():
    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1)
    calls = []
    real_forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs) or real_forward(*args, **kwargs)
    policy = PositionPolicy("rolling", frames_per_block=2, window_frames=4, train_shift=7)
    loss_fn = FlowMatchingLoss(FlowLossConfig(sink_evicted=0.5), causal=True, frames_per_block=2, positions=policy)
    g = torch.Generator().manual_seed(2)
    batch = {"latents": torch.randn(32, 4, 8, 4, 4, generator=g), "reference": torch.randn(32, 4, 1, 4, 4, generator=g),
             "text": torch.randn(32, 5, 32, generator=g)}
    loss, _ = loss_fn(model, batch, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(loss)
    (kw,) = calls
    evicted = ~kw["sink_visible"].all(dim=1)
    assert 6 <= int(evicted.sum()) <= 26    # about half of 32
    # Evicted clips: the stream's first 8 frames, the reference just before them for every block, visible to the
    # first 2 blocks (the window) only. The others: placed and seen as before.
    for i in range(32):
        if evicted[i]:
            assert kw["frame_pos"][i].tolist() == list(range(8))
            assert kw["reference_pos"][i].flatten().tolist() == [-1] * 4
            assert kw["sink_visible"][i].tolist() == [True, True, False, False]
        else:
            r = int(kw["frame_pos"][i, 0])
            assert kw["reference_pos"][i].flatten().tolist() == [paper_sink_position("rolling", r + 2 * j, -1, 2, 10)
                                                                  for j in range(4)]
    with pytest.raises(ValueError, match="model.dit.reference=sink"):
        concat = randomise(AvatarDiT(tiny_config(reference="concat", frames_per_block=2)), std=0.1)
        loss_fn(concat, batch)


def test_the_mouth_weight_scales_the_squared_error_inside_the_mouth_region():
    """``loss.mouth_weight = w``: each squared error counts ``1 + w * region``. With the region everywhere the loss
    is ``(1 + w)`` times the plain one (same noise, same levels), nowhere it is the plain one, and half of it lands
    in between; without a region in the batch the loss refuses."""
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1)
    g = torch.Generator().manual_seed(3)
    batch = {"latents": torch.randn(2, 4, 4, 4, 4, generator=g), "reference": torch.randn(2, 4, 1, 4, 4, generator=g),
             "text": torch.randn(2, 5, 32, generator=g)}
    plain_cfg = dict(drop_text=0.0, drop_audio=0.0)

    def loss(weight, region):
        fn = FlowMatchingLoss(FlowLossConfig(mouth_weight=weight, **plain_cfg), causal=True, frames_per_block=2)
        extra = {} if region is None else {"mouth_region": region}
        with torch.no_grad():
            return fn(model, {**batch, **extra}, torch.Generator().manual_seed(7))[0]

    plain = loss(0.0, None)
    ones, zeros = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    torch.testing.assert_close(loss(4.0, ones), 5.0 * plain)
    torch.testing.assert_close(loss(4.0, zeros), plain)
    half = zeros.clone()
    half[..., :2] = 1.0
    assert plain < loss(4.0, half) < 5.0 * plain
    with pytest.raises(ValueError, match="mouth_region"):
        loss(4.0, None)
    with pytest.raises(ValueError, match="mouth_weight"):
        FlowLossConfig(mouth_weight=-1.0)
