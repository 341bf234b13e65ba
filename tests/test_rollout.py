"""Stage 2's Self-Forcing rollout through the engine's forward: it reproduces inference, its history modes
differ, its cache never carries a graph, and block-wise gradient accumulation equals the one-shot gradient."""
import pytest
import torch

from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore
from liveavatar.models import AvatarDiT
from liveavatar.models.audio import group_by_latent_frame
from liveavatar.training.rollout import RolloutSettings, SelfForcingRollout

from conftest import randomise, tiny_config

FPB, LATENT = 2, (4, 4, 4)


def build(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(reference="sink", frames_per_block=FPB, audio_dim=16, audio_feature_dim=8, audio_blocks=[1],
                      audio_modulation=True)
    model = randomise(AvatarDiT(cfg), std=0.1).to(dtype)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(1, 5, 32, generator=g, dtype=dtype)
    reference = torch.randn(1, 4, 1, 4, 4, generator=g, dtype=dtype)
    features = torch.randn(1, 1 + 4 * (5 * FPB - 1), 1, 8, generator=g, dtype=dtype)
    grouped = group_by_latent_frame(features, 5 * FPB)
    audio = [grouped[:, b * FPB : (b + 1) * FPB] for b in range(5)]
    return model, context, reference, audio


def core_for(model, context, reference, **kw):
    settings = dict(steps=[1000, 750, 500], window_blocks=1, sink="aas", sink_switch_block=1, rope_policy="rapr",
                    rapr_distance=5)
    settings.update(kw)
    return StreamCore(model, EngineSettings(**settings), LATENT, context, reference, seed=7, lanes=1)


def test_rollout_exiting_at_the_last_step_with_clean_history_is_inference():
    model, context, reference, audio = build()
    model.eval()
    with torch.no_grad():
        engine = SequentialEngine(core_for(model, context, reference, history="clean", context_noise=0.0))
        expected = torch.cat([x for _, x in engine.stream(audio)], dim=2)
        rollout = SelfForcingRollout(core_for(model, context, reference), RolloutSettings(history="clean"))
        got, _ = rollout.run(audio, exit_step=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_history_modes_write_different_caches():
    model, context, reference, audio = build()
    videos = {}
    with torch.no_grad():
        for history in ("corrupt", "clean", "fixed_noise"):
            rollout = SelfForcingRollout(core_for(model, context, reference), RolloutSettings(history=history))
            videos[history], _ = rollout.run(audio[:3], exit_step=1)
    first = slice(0, FPB)
    for a, b in [("corrupt", "clean"), ("corrupt", "fixed_noise"), ("clean", "fixed_noise")]:
        torch.testing.assert_close(videos[a][:, :, first], videos[b][:, :, first])  # block 0 has no history
        assert (videos[a][:, :, FPB:] - videos[b][:, :, FPB:]).abs().max() > 1e-4, (a, b)


def test_the_cache_never_keeps_the_graph():
    model, context, reference, audio = build()
    core = core_for(model, context, reference)
    video, _ = SelfForcingRollout(core, RolloutSettings()).run(audio, exit_step=1)
    assert video.requires_grad
    assert not core.cache.k.requires_grad and core.cache.k.grad_fn is None and core.cache.v.grad_fn is None


def loss_of(video, weight):
    """Any differentiable loss of the whole rolled-out video (DMD's is of this kind: a function of the video)."""
    return (video * weight).sum() + 0.5 * (video ** 2).sum()


def one_shot_grads(model, context, reference, audio, weight, exit_step, checkpointing=False, **kw):
    model.zero_grad()
    model.gradient_checkpointing = checkpointing
    rollout = SelfForcingRollout(core_for(model, context, reference, **kw.pop("engine", {})), RolloutSettings(**kw))
    video, _ = rollout.run(audio, exit_step)
    loss_of(video, weight).backward()
    model.gradient_checkpointing = False
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, video.detach()


@pytest.mark.parametrize("history,exit_step", [("corrupt", 0), ("corrupt", 2), ("clean", 0), ("clean", 2),
                                               ("fixed_noise", 1)])
def test_blockwise_accumulation_equals_the_one_shot_gradient(history, exit_step):
    """float64, 5 blocks through a 1-block window with the AAS sink switching at block 1: the sum of the per-block
    gradients equals the gradient of the one-shot rollout, to rounding."""
    model, context, reference, audio = build(torch.float64)
    weight = torch.randn(1, 4, 5 * FPB, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected, video = one_shot_grads(model, context, reference, audio, weight, exit_step, history=history)

    model.zero_grad()
    rollout = SelfForcingRollout(core_for(model, context, reference), RolloutSettings(history=history))
    with torch.no_grad():
        video_nograd, records = rollout.run(audio, exit_step, keep_graph=False)
    torch.testing.assert_close(video_nograd, video, rtol=0, atol=0)
    leaf = video_nograd.clone().requires_grad_(True)
    (grad_video,) = torch.autograd.grad(loss_of(leaf, weight), leaf)
    rollout.backward_blockwise(records, exit_step, grad_video)
    assert not records  # every block's record is freed
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().max() > 1e-3 for g in expected.values())


def test_gradient_checkpointing_sees_the_cache_each_block_saw():
    """Recomputed blocks read the cache as it was at their forward (later blocks overwrote the ring since)."""
    model, context, reference, audio = build(torch.float64)
    weight = torch.randn(1, 4, 5 * FPB, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    plain, _ = one_shot_grads(model, context, reference, audio, weight, 1)
    recomputed, _ = one_shot_grads(model, context, reference, audio, weight, 1, checkpointing=True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def load_bench():
    """``bench/dmd_memory.py``'s peak measurement (profiler allocation events on the CPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "dmd_memory.py"
    spec = importlib.util.spec_from_file_location("dmd_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blockwise_peak_memory_does_not_grow_with_the_number_of_blocks():
    """Above the gradient buffers, a block-wise generator step over 8 blocks peaks within 20% of a 1-block step,
    while the one-shot step (the measurement's control) grows with every block."""
    peak_bytes = load_bench().peak_bytes
    model, context, reference, _ = build()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step(blocks, blockwise):
        model.zero_grad(set_to_none=False)
        rollout = SelfForcingRollout(core_for(model, context, reference), RolloutSettings())
        if blockwise:
            with torch.no_grad():
                video, records = rollout.run([None] * blocks, 2, keep_graph=False)
            rollout.backward_blockwise(records, 2, torch.ones_like(video))
        else:
            video, _ = rollout.run([None] * blocks, 2)
            video.sum().backward()

    peaks = {}
    for blockwise in (False, True):
        for blocks in (1, 8):
            step(blocks, blockwise)  # warm-up: RoPE tables, masks
            peaks[blockwise, blocks] = peak_bytes(lambda: step(blocks, blockwise), torch.device("cpu"))
    assert peaks[False, 8] > 3 * peaks[False, 1], peaks
    assert peaks[True, 8] < 1.2 * peaks[True, 1], peaks
