"""The project's stand-in for a GPU: everything runs with the model on the ``meta`` device.

PyTorch refuses to mix CPU and meta tensors exactly as it refuses CPU and CUDA tensors, and it refuses
``.item()``/``bool()`` on a meta tensor as a GPU pipeline would stall on them; so a forward that builds a table on
the CPU, indexes a device tensor with a host tensor or synchronises with the host fails here as it would on a
GPU. Meta tensors have shapes and dtypes but no data, so these tests check that the code runs on a device and
keeps dtypes, not numbers (the CPU tests check numbers).
"""
import pytest
import torch
from omegaconf import OmegaConf

from liveavatar.devices import autocast_type
from liveavatar.engine.batch import StreamBatchEngine
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore
from liveavatar.engine.tpp import Channel, DiTStage, Layout, RankStats, StageOptions
from liveavatar.engine.positions import PositionPolicy
from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.vae import PatchVAE, WanVAE
from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss

pytestmark = pytest.mark.meta
META = torch.device("meta")
DTYPES = [torch.float32, torch.bfloat16]


def tiny_preset(name: str = "tiny") -> DiTConfig:
    from liveavatar.models.presets import preset_config

    return DiTConfig.from_dict(preset_config(name)["dit"])


def meta_model(dtype, **overrides) -> AvatarDiT:
    cfg = tiny_preset()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with META:
        return AvatarDiT(cfg).to(dtype).eval().requires_grad_(False)


def stream_inputs(cfg: DiTConfig, dtype):
    context = torch.randn(1, 4, cfg.text_dim, device=META)
    reference = torch.randn(1, cfg.in_dim, 1, 8, 8, device=META, dtype=dtype)
    audio = torch.randn(1, cfg.frames_per_block, cfg.video_frames_per_latent, cfg.audio_layers_in,
                        cfg.audio_feature_dim, device=META)
    return context, reference, audio


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("engine", [SequentialEngine, StreamBatchEngine], ids=["sequential", "stream_batch"])
@pytest.mark.parametrize("policy,sink", [("rolling", "aas"), ("rapr", "reference"), ("absolute", "none")])
def test_engines_stream_past_the_window_on_the_device(engine, dtype, policy, sink):
    model = meta_model(dtype)
    context, reference, audio = stream_inputs(model.config, dtype)
    settings = EngineSettings(steps=[1000, 750, 500], window_blocks=1, rope_policy=policy, sink=sink, rapr_distance=5)
    core = StreamCore(model, settings, (model.config.in_dim, 8, 8), context, reference)
    assert core.cache.k.device == META and core.cache.k.dtype == dtype
    outs = [(b, x0) for b, x0 in engine(core).stream(audio for _ in range(6))]
    assert [b for b, _ in outs] == list(range(6))
    assert all(x0.device == META and x0.shape == (1, model.config.in_dim, 3, 8, 8) for _, x0 in outs)
    assert core.cache.k.dtype == dtype  # the cache keeps the model's dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_s2v_streams_with_the_sinks_motion_tokens_on_the_device(dtype):
    # tiny-s2v as liveavatar-14b streams: FramePack tokens in the sink, re-written when AAS switches it.
    cfg = tiny_preset("tiny-s2v")
    with META:
        model = AvatarDiT(cfg).to(dtype).eval().requires_grad_(False)
    context, reference, _ = stream_inputs(cfg, dtype)
    motion = torch.randn(1, cfg.in_dim, 19, 8, 8, device=META, dtype=dtype)
    features = torch.randn(1, 6 * cfg.frames_per_block * cfg.video_frames_per_latent, cfg.audio_layers_in,
                           cfg.audio_feature_dim, device=META)
    settings = EngineSettings(steps=[1000, 500], window_blocks=1, sink="aas", sink_motion=True)
    core = StreamCore(model, settings, (cfg.in_dim, 8, 8), context, reference, sink_motion=motion)
    outs = list(StreamBatchEngine(core).stream(model.audio_block_inputs(features)))
    assert [b for b, _ in outs] == list(range(6)) and all(x0.device == META for _, x0 in outs)
    assert core.cache.fixed_k.device == META and core.cache.fixed_k.dtype == dtype and core.cache.fixed_tokens > 0


def test_clean_history_streams_on_the_device():
    model = meta_model(torch.bfloat16)
    context, reference, audio = stream_inputs(model.config, torch.bfloat16)
    core = StreamCore(model, EngineSettings(steps=[1000, 500], window_blocks=1, history="clean", context_noise=50.0),
                      (model.config.in_dim, 8, 8), context, reference)
    assert len(list(SequentialEngine(core).stream(audio for _ in range(4)))) == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_one_tpp_stage_forward_on_the_device(dtype):
    model = meta_model(dtype)
    context, reference, audio = stream_inputs(model.config, dtype)
    layout = Layout(steps=3)
    for step in range(3):
        core = StreamCore(model, EngineSettings(steps=[1000, 750, 500], window_blocks=1), (model.config.in_dim, 8, 8),
                          context, reference, lanes=1)
        stage = DiTStage(core, step, layout, Channel(META, RankStats(step, "step")), StageOptions())
        x = core.noise(0, step)
        for block in range(3):
            x0, out = stage._compute(x, block, audio)
            assert x0.device == META and out.device == META and out.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_streaming_vae_decode_on_the_device(dtype):
    from diffusers import AutoencoderKLWan

    with META:
        model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[True, True], scale_factor_spatial=4,
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).to(dtype)
    vae = WanVAE(model)
    decoder = vae.stream_decoder()
    chunks = [decoder.decode(torch.randn(1, 4, 3, 4, 4, device=META, dtype=dtype)) for _ in range(3)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12]
    assert all(c.device == META for c in chunks)
    patch = PatchVAE(2).stream_decoder().decode(torch.randn(1, 12, 3, 8, 8, device=META, dtype=dtype))
    assert patch.device == META and patch.shape == (1, 3, 3, 16, 16)


def meta_batch(cfg: DiTConfig, frames: int) -> dict[str, torch.Tensor]:
    """A training batch of two clips of ``frames`` latent frames on the meta device."""
    return {
        "latents": torch.randn(2, cfg.in_dim, frames, 8, 8, device=META),
        "reference": torch.randn(2, cfg.in_dim, 1, 8, 8, device=META),
        "audio": torch.randn(2, frames * cfg.video_frames_per_latent, cfg.audio_layers_in, cfg.audio_feature_dim,
                             device=META),
        "text": torch.randn(2, 4, cfg.text_dim, device=META),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("stage", ["teacher", "diffusion_forcing"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-s2v"])
def test_one_training_step_on_the_device(stage, dtype, preset):
    cfg = tiny_preset(preset)
    with META:
        model = AvatarDiT(cfg).to(dtype).train()
    model.gradient_checkpointing = stage == "teacher"  # both paths: recomputed and stored activations
    # (rapr caps the distance to a reference behind the clip; the s2v reference sits ahead, at position 30)
    positions = PositionPolicy("rolling" if cfg.family == "s2v" else "rapr", cfg.frames_per_block, 3,
                               reference_position=cfg.reference_position, max_distance=5, train_shift=10)
    # Diffusion Forcing also weights the mouth (loss.mouth_weight: the region is a batch tensor, used on the device).
    mouth_weight = 20.0 if stage == "diffusion_forcing" else 0.0
    loss_fn = FlowMatchingLoss(FlowLossConfig(mouth_weight=mouth_weight), causal=stage == "diffusion_forcing",
                               frames_per_block=cfg.frames_per_block, positions=positions)
    frames = 2 * cfg.frames_per_block
    batch = meta_batch(cfg, frames)
    if mouth_weight:
        batch["mouth_region"] = torch.zeros(2, frames, 8, 8, device=META)
    if cfg.family == "s2v":  # tiny-s2v trains with the sink's FramePack motion tokens, as it streams
        batch["sink_motion"] = torch.randn(2, cfg.in_dim, 19, 8, 8, device=META)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.0, 0.999))
    with torch.autocast(autocast_type(META), dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, stats = loss_fn(model, batch)
    assert loss.device == META and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.blocks[0].parameters())
    if cfg.family == "s2v":  # the audio reaches the loss through the S2V encoder and injector
        for module in (model.casual_audio_encoder, model.audio_injector, model.trainable_cond_mask,
                       model.frame_packer):
            assert all(p.grad is not None and p.grad.device == META for p in module.parameters())
    optimizer.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("policy", ["rolling", "absolute"])
def test_a_diffusion_forcing_step_with_an_evicted_sink_on_the_device(dtype, policy):
    # loss.sink_evicted: half the clips placed as engine.sink=evicted streams them (stream start, the sink hidden
    # from the blocks past the window). Its draws happen on the host and are copied over; the placement (where,
    # arange, the window mask) must be built on the device, and nothing may read a value back.
    cfg = tiny_preset()
    assert cfg.reference == "sink"
    with META:
        model = AvatarDiT(cfg).to(dtype).train()
    positions = PositionPolicy(policy, cfg.frames_per_block, cfg.frames_per_block,  # a one-block window
                               reference_position=cfg.reference_position, train_shift=10)
    loss_fn = FlowMatchingLoss(FlowLossConfig(sink_evicted=0.5), causal=True, frames_per_block=cfg.frames_per_block,
                               positions=positions)
    blocks = 3  # past the one-block window: the later blocks' sink visibility depends on the eviction
    frames = blocks * cfg.frames_per_block
    batch = meta_batch(cfg, frames)
    seen = {}
    forward = model.forward

    def record(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    model.forward = record
    with torch.autocast(autocast_type(META), dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, stats = loss_fn(model, batch, torch.Generator().manual_seed(0))
    # The evicted placement reached the model, on the device.
    assert seen["sink_visible"].device == META and seen["sink_visible"].shape == (2, blocks)
    assert seen["sink_visible"].dtype == torch.bool
    assert seen["frame_pos"].device == META and seen["frame_pos"].shape == (2, frames)
    assert seen["reference_pos"].device == META and seen["reference_pos"].shape == (2, frames // cfg.frames_per_block, 1)
    assert loss.device == META and loss.shape == () and all(v.device == META for v in stats.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(model.parameters(), lr=1e-4).step()

def test_autocast_maps_devices_without_a_backend():
    assert autocast_type(META) == "cpu" and autocast_type("cpu") == "cpu" and autocast_type("cuda:1") == "cuda"
