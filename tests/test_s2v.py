"""The Wan2.2-S2V family: the original's parameter names and count, checkpoints in the original layout, and the
family streamed through the engines against the full-sequence causal forward.

The forward itself is compared with the original code by ``scripts/compare_original.py`` (relative error
below 1e-6; the original repositories cannot be vendored into CI). Here the independent references are the
original's key list (``data/wan22_s2v_tiny_keys.json``, produced by that script's import of the original code) and
the full-sequence forward.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from liveavatar.engine.batch import StreamBatchEngine
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore
from liveavatar.models import AvatarDiT, DiTConfig, from_preset
from liveavatar.models.checkpoint import CheckpointError

from conftest import infer_in_process, randomise
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

    # inspect: the family, its injector layers, and a clean fit against an S2V preset of these widths.
    from liveavatar.checkpoints import inspect, table

    summary = inspect(tmp_path / "s2v", preset="tiny-s2v")
    assert summary.family == "wan2.2-s2v" and summary.widths["audio blocks"] == 2
    # every key is an S2V key the preset knows; only the widths (48 vs 64, 3 vs 4 layers) differ
    assert not summary.problems["unexpected"] and summary.problems["other shape"]
    assert "plain Wan2.2-S2V checkpoint" in table(summary)

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


def test_sink_motion_tokens_stream_as_the_full_sequence_causal_forward_puts_them(setup):
    # Live Avatar's release keeps FramePack tokens of the still reference in its sink (model.sink_motion). 14 blocks
    # through a 2-block window: the engines' fixed sink tokens, re-rotated per block as the stream moves away from
    # their positions (-1, -3, -19..-4), must give what the full-sequence causal forward gives with the motion
    # tokens in every block's sink; and they must matter.
    model, context, _ = setup
    g = torch.Generator().manual_seed(5)
    reference, motion = torch.randn(1, 4, 1, 8, 8, generator=g), torch.randn(1, 4, 19, 8, 8, generator=g)
    steps, window, n = [1000, 600], 2, 14
    feats = features(n)
    kw = dict(steps=steps, sink="reference", window_blocks=window, rope_policy="rolling", sink_motion=True)
    latent = (4, 8, 8)
    core = StreamCore(model, EngineSettings(**kw), latent, context, reference, seed=3, sink_motion=motion)
    assert core.cache.fixed_tokens == 16 + 4 + 4  # 4x4 tokens, one 2x-coarser frame, four 4x-coarser frames
    got = torch.cat([x for _, x in SequentialEngine(core).stream(model.audio_block_inputs(feats))], dim=2)
    expected = full_sequence_rollout((model, context, reference), n, "timestep_forced", steps, "rolling", window,
                                     audio_upto=lambda b: feats[:, : 4 * FPB * b], motion_latents=motion)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    core = StreamCore(model, EngineSettings(**kw), latent, context, reference, seed=3, sink_motion=motion)
    batched = torch.cat([x for _, x in StreamBatchEngine(core).stream(model.audio_block_inputs(feats))], dim=2)
    torch.testing.assert_close(batched, got, rtol=1e-5, atol=1e-6)

    plain = StreamCore(model, EngineSettings(**{**kw, "sink_motion": False}), latent, context, reference, seed=3)
    without = torch.cat([x for _, x in SequentialEngine(plain).stream(model.audio_block_inputs(feats))], dim=2)
    assert (without - got).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3  # every frame feels the motion tokens


def test_sink_motion_needs_its_latents_and_a_framepack_model(setup):
    model, context, reference = setup
    kw = dict(steps=[1000], sink="reference", sink_motion=True)
    with pytest.raises(ValueError, match="needs the motion latents"):
        StreamCore(model, EngineSettings(**kw), (4, 8, 8), context, reference)
    with pytest.raises(ValueError, match="engine.sink=none"):
        StreamCore(model, EngineSettings(**{**kw, "sink": "none"}), (4, 8, 8), context, reference,
                   sink_motion=torch.zeros(1, 4, 19, 8, 8))
    plain = AvatarDiT(s2v_config(framepack=False)).eval()
    with pytest.raises(ValueError, match="FramePack"):
        StreamCore(plain, EngineSettings(**kw), (4, 8, 8), context, reference, sink_motion=torch.zeros(1, 4, 19, 8, 8))


TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]  # Live Avatar's lora_target_modules


def test_released_lora_merges_to_what_peft_computes(tmp_path, setup):
    # A LoRA over the S2V module names saved as peft saves it (base_model.model.<module>.lora_A.weight), and once
    # more with the adapter name in the keys (how Live Avatar's loader expects them): merged here, the model must
    # compute what peft computes with the adapters unmerged.
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    from liveavatar.models.lora import merge_lora

    model, context, reference = setup
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    state = peft.get_peft_model_state_dict(adapted)
    assert len(state) == 2 * (3 * 10 + 2 * 4)  # every block's attention and FFN, and each audio injector
    (tmp_path / "peft").mkdir()
    save_file(state, tmp_path / "peft" / "liveavatar.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, tmp_path / "named.safetensors")

    x, t, audio = torch.randn(1, 4, FPB, 8, 8), torch.tensor([300.0]), features(1)
    ref = reference.repeat(1, 1, 1, 2, 2)
    with torch.no_grad():
        want = adapted.get_base_model()(x, t, context, audio=audio, reference=ref)
        before = model(x, t, context, audio=audio, reference=ref)
        for source in (tmp_path / "peft", tmp_path / "named.safetensors"):
            merged = copy.deepcopy(model)
            assert merge_lora(merged, source, alpha=2) == {"modules": 38, "rank": 4}
            torch.testing.assert_close(merged(x, t, context, audio=audio, reference=ref), want, rtol=1e-4, atol=1e-5)
    assert (want - before).abs().max() > 1e-2  # the LoRA changes the output: the comparison compares something


def test_a_lora_that_does_not_fit_is_one_error_and_changes_nothing(tmp_path, setup):
    from safetensors.torch import save_file

    from liveavatar.models.lora import merge_lora

    model = copy.deepcopy(setup[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 48), "blocks.0.self_attn.q.lora_B.weight": torch.ones(48, 2),
               "blocks.9.self_attn.q.lora_A.weight": torch.ones(2, 48), "blocks.9.self_attn.q.lora_B.weight": torch.ones(48, 2),
               "blocks.1.ffn.0.lora_A.weight": torch.ones(2, 64), "blocks.1.ffn.0.lora_B.weight": torch.ones(96, 2)},
              tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit the base model: modules not in the base model \(1\): "
                                              r"blocks\.9\.self_attn\.q; shape mismatches \(1\): blocks\.1\.ffn\.0"):
        merge_lora(model, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def tiny_s2v_files(tmp_path_factory):
    """A tiny S2V checkpoint in the original layout (random non-zero weights, sharded) and a tiny Wan VAE folder."""
    from diffusers import AutoencoderKLWan

    from liveavatar.models.presets import preset_config

    folder = tmp_path_factory.mktemp("tiny_s2v")
    torch.manual_seed(0)
    randomise(from_preset("tiny-s2v", device="cpu"), std=0.15, seed=1).save_pretrained(folder / "dit",
                                                                                       max_shard_bytes=400_000)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
                     scale_factor_spatial=4).save_pretrained(folder / "vae")
    assert preset_config("tiny-s2v")["dit"]["family"] == "s2v"
    return folder


def infer_s2v(files, out, *overrides, nproc=None):
    """The frames infer.py writes: under torchrun with ``nproc`` ranks, else ``infer_in_process``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["model=tiny-s2v", f"checkpoint={files / 'dit'}", f"model.vae.path={files / 'vae'}", "max_seconds=1.0",
            "denoise.steps=[1000,500]", f"output.path={out}", "output.frames=true", *overrides]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(root / "infer.py")]
        result = subprocess.run(cmd + args, cwd=root, capture_output=True, text=True, timeout=300,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        infer_in_process(args)
    return np.load(Path(out).with_suffix(".frames.npy"))


@pytest.mark.distributed
def test_tiny_s2v_checkpoint_streams_through_every_engine(tmp_path, tiny_s2v_files):
    # The original layout (sharded, S2V keys) loads strictly and streams, frame for frame the same through the
    # sequential engine, stream_batch and TPP (2 DiT ranks and a decoding rank under torchrun).
    sequential = infer_s2v(tiny_s2v_files, tmp_path / "seq.mp4", "engine=sequential")
    assert sequential.shape[0] >= 20 and sequential.std() > 1  # a second of video that is not one flat colour
    batched = infer_s2v(tiny_s2v_files, tmp_path / "batch.mp4", "engine=stream_batch")
    # Batched lanes reduce in another order: latents equal to ~1e-6, at most one level apart once decoded to uint8.
    assert np.abs(batched.astype(int) - sequential.astype(int)).max() <= 1
    np.testing.assert_array_equal(infer_s2v(tiny_s2v_files, tmp_path / "tpp.mp4", "engine=tpp", nproc=3), sequential)
    # tiny-s2v streams as liveavatar-14b does, with the FramePack tokens of the still reference in the sink (made by
    # the VAE on every rank above); without them the video changes.
    # Audio features computed block by block as the audio arrives (live input): each block's 12 video frames, as
    # the release pairs them; the tiny preset's energy features see only the frame before, so with any look-back
    # the video is the whole-file one.
    live = infer_s2v(tiny_s2v_files, tmp_path / "live.mp4", "engine=sequential", "audio_features.streaming=true",
                     "audio_features.lookback_s=0.2")
    np.testing.assert_array_equal(live, sequential)
    plain = infer_s2v(tiny_s2v_files, tmp_path / "plain.mp4", "engine=sequential", "model.sink_motion=false")
    print("sink motion: mean |difference| in levels", np.abs(plain.astype(int) - sequential.astype(int)).mean())
    assert np.abs(plain.astype(int) - sequential.astype(int)).mean() > 0.05

    # lora= merges a LoRA over the S2V names (here on every block's self-attention query and audio injector 0):
    # the stream changes, so the frames above are the model's work, not only the noise's. (The tiny random VAE
    # decodes latent changes into small pixel changes: 0.13 levels on average measured; unmerged it is 0.)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    modules = [f"blocks.{i}.self_attn.q" for i in range(4)] + ["audio_injector.injector.0.q"]
    save_file({f"base_model.model.{m}.lora_{ab}.weight": torch.randn(shape, generator=g) for m in modules
               for ab, shape in (("A", (2, 64)), ("B", (64, 2)))}, tmp_path / "lora.safetensors")
    adapted = infer_s2v(tiny_s2v_files, tmp_path / "lora.mp4", "engine=sequential", f"lora={tmp_path / 'lora.safetensors'}")
    assert np.abs(adapted.astype(int) - sequential.astype(int)).mean() > 0.05


def test_toy_samples_carry_the_still_reference_for_the_sinks_motion_tokens():
    from liveavatar.data.toy import make_clip
    from liveavatar.models.vae import PatchVAE
    from liveavatar.training.datamodule import ToyDataset

    from conftest import tiny_config

    dit = tiny_config(in_dim=12, out_dim=12, text_dim=32, text_len=16, audio_dim=16, audio_feature_dim=32,
                      audio_layers_in=1, audio_blocks=[0])
    data = ToyDataset(10, 3, dit, sink_motion_frames=5)
    sample = data[4]
    image = make_clip(data.clip_seed(4), 3).reference
    expected = PatchVAE(2).encode(image[None, :, None].expand(-1, -1, 5, -1, -1).contiguous())[0]
    assert sample["sink_motion"].shape == (12, 5, 16, 16)
    torch.testing.assert_close(sample["sink_motion"], expected, rtol=0, atol=0)
    assert "sink_motion" not in ToyDataset(10, 3, dit)[4]


def test_diffusion_forcing_sees_the_sinks_motion_tokens(setup):
    # Stage 1 with model.sink_motion: the batch's still-reference latents join every block's sink in the loss.
    from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss

    model, context, _ = setup
    g = torch.Generator().manual_seed(7)
    batch = {"latents": torch.randn(1, 4, 2 * FPB, 8, 8, generator=g), "reference": torch.randn(1, 4, 1, 8, 8, generator=g),
             "audio": features(2), "text": context}
    loss_fn = FlowMatchingLoss(FlowLossConfig(drop_text=0, drop_audio=0), causal=True, frames_per_block=FPB)
    plain, _ = loss_fn(model, batch, torch.Generator().manual_seed(0))
    batch["sink_motion"] = torch.randn(1, 4, 19, 8, 8, generator=g)
    with_motion, _ = loss_fn(model, batch, torch.Generator().manual_seed(0))
    assert abs(with_motion.item() - plain.item()) > 1e-4 * plain.item()
