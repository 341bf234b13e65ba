"""The streaming engines against an independent reference (the full-sequence causal forward), and against
each other."""
import pytest
import torch

from liveavatar.diffusion.flow import FlowSchedule
from liveavatar.engine.batch import StreamBatchEngine
from liveavatar.engine.positions import PositionPolicy
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore, block_noise
from liveavatar.models import AvatarDiT
from liveavatar.models.audio import group_by_latent_frame

from conftest import randomise, tiny_config

FPB = 2  # latent frames per block in these tests
LATENT = (4, 4, 4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config(reference="sink", frames_per_block=FPB, audio_dim=16, audio_feature_dim=8, audio_blocks=[1],
                      audio_modulation=True)
    model = randomise(AvatarDiT(cfg), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    context = torch.randn(1, 5, 32, generator=g)
    reference = torch.randn(1, 4, 1, 4, 4, generator=g)
    return model, context, reference


def audio_blocks(n_blocks, seed=2):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 1 + 4 * (n_blocks * FPB - 1), 1, 8, generator=g)
    grouped = group_by_latent_frame(features, n_blocks * FPB)
    return grouped, [grouped[:, b * FPB : (b + 1) * FPB] for b in range(n_blocks)]


def run(engine_cls, setup, n_blocks, seed=3, **kw):
    model, context, reference = setup
    core = StreamCore(model, EngineSettings(**kw), LATENT, context, reference, seed=seed)
    _, blocks = audio_blocks(n_blocks)
    return torch.cat([x for _, x in engine_cls(core).stream(blocks)], dim=2), core


def full_sequence_rollout(setup, n_blocks, history, steps, seed=3, shift=5.0):
    """Block-by-block sampling where every forward is the full-sequence causal forward over the whole video so
    far (no cache): the history blocks at their cached noise level, then the current block."""
    model, context, reference = setup
    grouped, _ = audio_blocks(n_blocks)
    flow = FlowSchedule(shift)
    ts = flow.warp(steps)
    shape = (1, 4, FPB, 4, 4)
    inputs = {}  # (block, step) -> the block's input at that step
    clean = []
    for b in range(n_blocks):
        x = block_noise(seed, b, 0, shape, "cpu")
        for s, t in enumerate(ts):
            inputs[b, s] = x
            if history == "timestep_forced":
                past, t_past = [inputs[j, s] for j in range(b)], t
            else:
                past, t_past = clean, 0.0
            seq = torch.cat(past + [x], dim=2)
            tt = torch.cat([torch.full((1, FPB * b), float(t_past)), torch.full((1, FPB), float(t))], dim=1)
            with torch.no_grad():
                v = model(seq, tt, context, audio=grouped[:, : FPB * (b + 1)], causal=True, reference=reference,
                          reference_pos=torch.tensor([-1]))[:, :, -FPB:]
            x0 = flow.x0_from_velocity(x, v, t.reshape(1))
            if s + 1 < len(ts):
                x = flow.add_noise(x0, block_noise(seed, b, s + 1, shape, "cpu"), ts[s + 1].reshape(1))
        clean.append(x0)
    return torch.cat(clean, dim=2)


@pytest.mark.parametrize("history", ["timestep_forced", "clean"])
@pytest.mark.parametrize("policy", ["absolute", "rolling"])
def test_cached_engine_equals_full_sequence_forward(setup, history, policy):
    # The video fits the window (3 history blocks + the current one), so nothing is evicted and every policy
    # gives absolute positions: the cache must reproduce the full causal forward exactly.
    steps = [1000, 750, 500, 250]
    got, _ = run(SequentialEngine, setup, 4, steps=steps, sink="reference", history=history, window_blocks=3,
                 rope_policy=policy)
    expected = full_sequence_rollout(setup, 4, history, steps)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(sink="aas", rope_policy="rolling"),
        dict(sink="reference", keep_first_block=True, rope_policy="rapr", rapr_distance=4),
        dict(sink="none", rope_policy="absolute", steps=[1000, 500, 250]),
    ],
)
def test_stream_batch_equals_sequential(setup, kw):
    kw = dict(dict(steps=[1000, 750, 500, 250], window_blocks=2, history="timestep_forced"), **kw)
    a, _ = run(SequentialEngine, setup, 9, **kw)
    b, _ = run(StreamBatchEngine, setup, 9, **kw)
    assert a.shape == (1, 4, 9 * FPB, 4, 4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stream_batch_refuses_clean_history(setup):
    model, context, reference = setup
    core = StreamCore(model, EngineSettings(history="clean"), LATENT, context, reference)
    with pytest.raises(ValueError, match="needs engine.history=timestep_forced"):
        StreamBatchEngine(core)
    core = StreamCore(model, EngineSettings(sink="aas", sink_switch_block=2), LATENT, context, reference)
    with pytest.raises(ValueError, match="cannot switch the sink before block 4"):
        StreamBatchEngine(core)


def test_adaptive_attention_sink_switches_once_to_the_first_generated_frame(setup):
    kw = dict(steps=[1000, 750, 500, 250], window_blocks=2)
    aas, core = run(SequentialEngine, setup, 7, sink="aas", **kw)
    ref, _ = run(SequentialEngine, setup, 7, sink="reference", **kw)
    switch = core.settings.switch_block * FPB
    torch.testing.assert_close(aas[:, :, :switch], ref[:, :, :switch], rtol=0, atol=0)
    assert (aas[:, :, switch:] - ref[:, :, switch:]).abs().max() > 1e-4
    # The sink now holds block 0's first frame: recompute its keys by hand and compare with the cache.
    state = core.sink.for_block(switch // FPB)
    torch.testing.assert_close(state.latents, aas[:, :, :1])
    assert core.lane_sink_version == [1, 1, 1, 1]


def test_rope_position_policies():
    frames = torch.arange(30, 33)
    rolling = PositionPolicy("rolling", window_frames=9)
    assert rolling.positions(frames, 30).tolist() == [9, 10, 11]
    assert rolling.positions(torch.arange(21, 30), 30).tolist() == list(range(9))
    assert rolling.positions(torch.arange(3, 6), 3).tolist() == [3, 4, 5]  # early blocks: absolute
    assert PositionPolicy("rapr", max_distance=10).positions(frames, 30).tolist() == [9, 10, 11]
    assert PositionPolicy("rapr", max_distance=4).positions(frames, 30).tolist() == [3, 4, 5]
    assert PositionPolicy("absolute").positions(frames, 30).tolist() == [30, 31, 32]
    with pytest.raises(ValueError, match="model.rope.policy"):
        PositionPolicy("alibi")


def test_long_stream_keeps_constant_memory_and_finite_output():
    """2,000+ latent frames on the tiny preset: finite output, and the cache never reallocates or grows."""
    from omegaconf import OmegaConf
    from liveavatar.models import DiTConfig

    preset = OmegaConf.load("conf/model/tiny.yaml")
    torch.manual_seed(0)
    model = randomise(AvatarDiT(DiTConfig.from_dict(OmegaConf.to_container(preset.dit))), std=0.05).eval()
    fpb = model.config.frames_per_block
    blocks = -(-2000 // fpb)
    core = StreamCore(model, EngineSettings(steps=[1000, 500]), (12, 16, 16), torch.randn(1, 4, 32),
                      torch.randn(1, 12, 1, 16, 16))
    feats = torch.randn(1, 1, 1, 32).expand(1, fpb, 1, 1, 32)
    seen = {}
    for b, x0 in SequentialEngine(core).stream(feats for _ in range(blocks)):
        assert torch.isfinite(x0).all(), f"block {b}"
        if b == 10 or b == blocks - 1:
            seen[b] = (core.cache.k.data_ptr(), core.cache.v.data_ptr(), core.cache.nbytes)
    assert blocks * fpb >= 2000
    assert seen[10] == seen[blocks - 1]
    assert core.cache.frame[0, core.cache.sink_frames:].max().item() == blocks * fpb - 1
