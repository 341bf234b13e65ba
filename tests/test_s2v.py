"""The Wan2.2-S2V family: the original's parameter names and count, checkpoints in the original layout, and the
family streamed through the engines against the full-sequence causal forward.

The forward itself is compared with the original code by ``scripts/compare_original_s2v.py`` (relative error
below 1e-6; the original repositories cannot be vendored into CI). Here the independent references are the
original's key list (``data/wan22_s2v_tiny_keys.json``, produced by that script's import of the original code) and
the full-sequence forward.
"""
import json
from pathlib import Path

import pytest
import torch

from liveavatar.engine.batch import StreamBatchEngine
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore
from liveavatar.models import AvatarDiT, DiTConfig, from_preset
from liveavatar.models.checkpoint import CheckpointError

from conftest import randomise
from test_engine import FPB, LATENT, full_sequence_rollout

DATA = Path(__file__).parent / "data"


def s2v_config(**overrides) -> DiTConfig:
    values = dict(family="s2v", in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, text_len=8,
                  num_heads=4, num_layers=3, frames_per_block=FPB, reference_position=30, audio_feature_dim=8,
                  audio_layers_in=2, audio_blocks=[0, 2], audio_adaptive_norm=True, cond_dim=4, framepack=True)
    values.update(overrides)
    return DiTConfig(**values)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomise(AvatarDiT(s2v_config()), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(1, 5, 32, generator=g), torch.randn(1, 4, 1, 4, 4, generator=g)


def features(n_blocks, seed=2):
    """wav2vec2-like features of ``n_blocks`` blocks: ``[1, 4 * FPB * n_blocks, layers, feat]``."""
    return torch.randn(1, 4 * FPB * n_blocks, 2, 8, generator=torch.Generator().manual_seed(seed))


def test_s2v_14b_preset_holds_exactly_the_original_parameters():
    # WanModel_S2V built from Wan2.2's wan_s2v_14B config on the meta device has 16,295,755,609 parameters.
    model = from_preset("wan2.2-s2v-14b")
    assert next(model.parameters()).device.type == "meta"
    assert model.num_parameters() == 16_295_755_609
    assert from_preset("liveavatar-14b").num_parameters() == 16_295_755_609


def test_keys_and_shapes_are_the_original_codes():
    fixture = json.loads((DATA / "wan22_s2v_tiny_keys.json").read_text())
    config = DiTConfig.from_dict({**fixture["config"], "model_type": "s2v"})
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in AvatarDiT(config).state_dict().items()}
    assert ours == fixture["keys"]


def test_original_layout_round_trip_is_strict_and_exact(tmp_path, setup):
    model, context, reference = setup
    model.save_pretrained(tmp_path / "s2v", max_shard_bytes=60_000)
    saved = json.loads((tmp_path / "s2v" / "config.json").read_text())
    assert saved["_class_name"] == "WanModel_S2V" and saved["audio_inject_layers"] == [0, 2]
    assert len(list((tmp_path / "s2v").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    loaded = AvatarDiT.from_pretrained(tmp_path / "s2v").eval()
    assert loaded.config == model.config
    x, t = torch.randn(1, 4, 2 * FPB, 8, 8), torch.tensor([400.0])
    audio, motion = features(2)[:, : 4 * 2 * FPB], torch.randn(1, 4, 7, 8, 8)
    with torch.no_grad():
        want = model(x, t, context, audio=audio, reference=reference.repeat(1, 1, 1, 2, 2),
                     motion_latents=motion)
        got = loaded(x, t, context, audio=audio, reference=reference.repeat(1, 1, 1, 2, 2),
                     motion_latents=motion)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # A Wan2.1 config over it, or a shard gone: one line each.
    with pytest.raises(CheckpointError, match="is a Wan2.2-S2V model.*family 'wan'"):
        AvatarDiT.from_pretrained(tmp_path / "s2v", config=s2v_config(family="wan", audio_dim=16))
    next((tmp_path / "s2v").glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        AvatarDiT.from_pretrained(tmp_path / "s2v")


def test_every_conditioning_path_reaches_the_output(setup):
    model, context, reference = setup
    ref = reference.repeat(1, 1, 1, 2, 2)
    x, t, audio = torch.randn(1, 4, FPB, 8, 8), torch.tensor([700.0]), features(1)
    with torch.no_grad():
        base = model(x, t, context, audio=audio, reference=ref)
        changed = {
            "audio": model(x, t, context, audio=audio.flip(1), reference=ref),
            "reference": model(x, t, context, audio=audio, reference=ref + 1),
            "pose condition": model(x, t, context, audio=audio, reference=ref, cond=torch.randn(1, 4, FPB, 8, 8)),
            "motion": model(x, t, context, audio=audio, reference=ref, motion_latents=torch.randn(1, 4, 3, 8, 8)),
        }
    for name, out in changed.items():
        assert (out - base).abs().max() > 1e-3, name


@pytest.mark.parametrize("policy", ["rolling"])
def test_s2v_streams_equal_the_full_sequence_causal_forward(setup, policy):
    # 18 blocks through a 2-block window, so the stream passes the reference (RoPE position 30) and Rolling RoPE
    # moves the sink ahead of it; each block's audio encoded on its own in both.
    model, context, reference = setup
    steps, window, n = [1000, 750, 500], 2, 18
    feats = features(n)
    kw = dict(steps=steps, sink="reference", window_blocks=window, rope_policy=policy, rapr_distance=6)
    core = StreamCore(model, EngineSettings(**kw), LATENT, context, reference, seed=3)
    got = torch.cat([x for _, x in SequentialEngine(core).stream(model.audio_block_inputs(feats))], dim=2)
    expected = full_sequence_rollout(setup, n, "timestep_forced", steps, policy, window, rapr_distance=6,
                                     audio_upto=lambda b: feats[:, : 4 * FPB * b])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    core = StreamCore(model, EngineSettings(**kw), LATENT, context, reference, seed=3)
    batched = torch.cat([x for _, x in StreamBatchEngine(core).stream(model.audio_block_inputs(feats))], dim=2)
    torch.testing.assert_close(batched, got, rtol=1e-5, atol=1e-6)
