"""Stage 1's motion-frame scaffold (``data.motion_frames``): the frames before each clip, noised independently,
as context every block attends to."""
import json

import pytest
import torch
from omegaconf import OmegaConf

import liveavatar.models.dit as dit_module
from liveavatar.data import toy
from liveavatar.devices import autocast_type
from liveavatar.engine.positions import PositionPolicy
from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.audio import EnergyMelFeatures
from liveavatar.models.layout import _mask
from liveavatar.models.vae import PatchVAE
from liveavatar.training.datamodule import AvatarDataModule, DataSettings, ToyDataset
from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss
from liveavatar.training.launch import train

from conftest import randomise, tiny_config
from test_train import FAST, compose_train, run_train

TOY_DIT = dict(in_dim=12, out_dim=12, text_dim=32, text_len=16, audio_dim=16, audio_feature_dim=32,
               audio_layers_in=1, audio_blocks=[0])


# ------------------------------------------------------------------------------------------------- data
def test_toy_motion_frames_are_the_frames_just_before_the_clip():
    k, frames = 2, 3
    data = ToyDataset(10, frames, tiny_config(**TOY_DIT), motion_frames=k)
    sample = data[4]
    # A longer clip of the same seed is the same stream further on: the sample is its frames 0..k+frames-1.
    longer = toy.make_clip(data.clip_seed(4), k + frames + 4)
    latents = PatchVAE(2).encode(longer.video[None])[0]
    audio = EnergyMelFeatures(n_mels=31)(longer.wav, k + frames + 4)[0]
    assert sample["motion"].shape == (12, k, 16, 16)
    torch.testing.assert_close(sample["motion"], latents[:, :k], rtol=0, atol=0)
    torch.testing.assert_close(sample["latents"], latents[:, k:k + frames], rtol=0, atol=0)
    # The clip's own rows of the stream's features (to float rounding: the FFT batches differ in length).
    torch.testing.assert_close(sample["audio"], audio[k:k + frames])
    assert (sample["audio"] - audio[:frames]).abs().max() > 0.1
    torch.testing.assert_close(sample["reference"], PatchVAE(2).encode(longer.reference[None, :, None])[0])

    plain = ToyDataset(10, frames, tiny_config(**TOY_DIT))[4]  # K = 0: the clip starts the stream, no motion key
    assert "motion" not in plain
    torch.testing.assert_close(plain["latents"], latents[:, :frames], rtol=0, atol=0)


def test_shards_refuse_motion_frames_in_one_line():
    settings = DataSettings(kind="shards", path="/nowhere", motion_frames=3)
    with pytest.raises(ValueError, match=r"^data.motion_frames=3: shards hold no motion frames[^\n]*$"):
        AvatarDataModule(settings, tiny_config(**TOY_DIT), {}).build()


def test_the_ablation_experiment_composes():
    cfg = compose_train("experiment=toy_df_motion")
    assert cfg.name == "toy_df_motion" and cfg.data.motion_frames == 3 and cfg.stage == "diffusion_forcing"
    assert cfg.model.dit.reference == "sink"
    assert compose_train("experiment=toy_df_sink").data.motion_frames == 0


# ------------------------------------------------------------------------------------------------- mask
def test_mask_rows_for_sink_motion_and_clip():
    # One token per frame; sink R = 1 with a copy per block; K = 2 motion frames; 4 clip frames in 2 blocks of 2;
    # window 0: a block sees only itself among the clip. Columns: sink copies 0, 1 | motion 0, 1 | clip 0..3.
    got = _mask(4, 2, 1, True, True, 0, 1, "cpu", 2).int().tolist()
    assert got == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # sink: only itself
        [1, 0, 1, 1, 0, 0, 0, 0],  # motion: the first block's sink copy and every motion frame, no clip
        [1, 0, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 1, 1, 0, 0],  # block 0: its sink, all motion, itself
        [1, 0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0, 1, 1],  # block 1: its sink, all motion (the window does not apply), itself
        [0, 1, 1, 1, 0, 0, 1, 1],
    ]
    assert torch.equal(_mask(4, 2, 1, True, True, 1, 3, "cpu", 0), _mask(4, 2, 1, True, True, 1, 3, "cpu"))


# ------------------------------------------------------------------------------------------------ model
def _inputs(frames=8, k=2, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, frames, 4, 4, generator=g), t=torch.rand(batch, frames, generator=g) * 1000,
                context=torch.randn(batch, 5, 32, generator=g), reference=torch.randn(batch, 4, 1, 4, 4, generator=g),
                motion=torch.randn(batch, 4, k, 4, 4, generator=g), motion_t=torch.rand(batch, k, generator=g) * 1000)


def test_no_motion_frames_is_the_plain_forward():
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1).eval()
    inp = _inputs(k=0)
    frame_pos = torch.arange(8)[None] + 5
    reference_pos = torch.tensor([[[3], [5], [7], [9]]])
    with torch.no_grad():
        for kw in (dict(), dict(frame_pos=frame_pos, reference_pos=reference_pos, window_blocks=1)):
            plain = model(inp["x"], inp["t"], inp["context"], causal=True, reference=inp["reference"], **kw)
            empty = model(inp["x"], inp["t"], inp["context"], causal=True, reference=inp["reference"],
                          motion=inp["motion"], motion_t=inp["motion_t"], **kw)
            assert torch.equal(plain, empty)


def _windowed(layers):
    """A forward of 4 blocks of 2 frames after 2 motion frames (positions 0, 1), window 1, the sink one block
    ahead of each block (rolling); returns ``run(**changed inputs)``."""
    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2, num_layers=layers)), std=0.1).eval()
    inp = _inputs()
    per_block_sink = torch.tensor([[[4], [6], [8], [10]]])

    def run(**changes):
        args = {**inp, **changes}
        with torch.no_grad():
            return model(args["x"], args["t"], args["context"], causal=True, reference=args["reference"],
                         motion=args["motion"], motion_t=args["motion_t"], window_blocks=1,
                         reference_pos=per_block_sink)

    return run, inp


def test_every_block_attends_to_the_motion_frames_whatever_its_window():
    # One layer: only direct attention carries information (with more, block 2 would relay it to block 3).
    run, inp = _windowed(layers=1)
    base = run()
    bumped = inp["motion"].clone()
    bumped[:, :, 0] += 1.0
    for changed in (run(motion=bumped), run(motion_t=inp["motion_t"] + 100)):
        for block in range(4):  # blocks 2 and 3 are beyond the window of a history that ended at block 0
            diff = (changed[:, :, 2 * block:2 * block + 2] - base[:, :, 2 * block:2 * block + 2]).abs().max()
            assert diff > 1e-4, block


def test_the_motion_frames_never_see_the_clip():
    # Two layers: were the motion frames to see the last block in the first layer, they would carry it to
    # block 0 in the second.
    run, inp = _windowed(layers=2)
    base = run()
    bumped = inp["x"].clone()
    bumped[:, :, 6:] += 1.0
    later = run(x=bumped)
    assert torch.equal(later[:, :, :6], base[:, :, :6])
    assert (later[:, :, 6:] - base[:, :, 6:]).abs().max() > 1e-4


def test_motion_frames_continue_the_stream_backwards(monkeypatch):
    seen = []
    real = dit_module.sequence_attention

    def spy(frame_pos, sink_pos, *args):
        seen.append((frame_pos, sink_pos, args))
        return real(frame_pos, sink_pos, *args)

    monkeypatch.setattr(dit_module, "sequence_attention", spy)
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1).eval()
    inp = _inputs(frames=4, k=3, batch=2)
    frame_pos = torch.tensor([[7, 8, 9, 10], [3, 4, 5, 6]])
    with torch.no_grad():
        model(inp["x"], inp["t"], inp["context"], causal=True, reference=inp["reference"], frame_pos=frame_pos,
              motion=inp["motion"], motion_t=inp["motion_t"])
        model(inp["x"], inp["t"], inp["context"], causal=True, reference=inp["reference"], motion=inp["motion"],
              motion_t=inp["motion_t"])
    (with_pos, _, args), (default_pos, sink, _) = seen
    assert with_pos.tolist() == [[4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 4, 5, 6]] and args[-3] == 3   # context frames
    assert default_pos.tolist() == list(range(7)) and sink.tolist() == [-1]  # the stream starts with the motion


# ------------------------------------------------------------------------------------------------- loss
def test_training_positions_start_the_clip_after_its_motion_frames():
    policy = PositionPolicy("absolute", frames_per_block=3, window_frames=6, train_shift=5)
    frame_pos, sink = policy.training_positions(64, 9, torch.Generator().manual_seed(0), context=3)
    assert frame_pos[:, 0].min() == 3 and frame_pos[:, 0].max() == 8
    assert torch.all(sink == -1)  # the absolute reference stays at -1, behind the motion frames at >= 0
    # RAPR's cap puts a late block's sink among the motion frames unless it clears them all.
    loss_fn = FlowMatchingLoss(FlowLossConfig(), causal=True, frames_per_block=3,
                               positions=PositionPolicy("rapr", 3, 6, max_distance=8, train_shift=12))
    with pytest.raises(ValueError, match=r"max_distance \(8\) must exceed 9"):
        loss_fn.check_motion(3, 9)
    loss_fn.check_motion(0, 9)
    PositionPolicy("rapr", 3, 6, max_distance=10, train_shift=12).check_context(3, 9)


def test_motion_levels_are_uniform_and_independent_per_frame():
    model = AvatarDiT(tiny_config(reference="sink", frames_per_block=2))
    calls = []

    def spy(x, t, *args, **kwargs):  # records what the model is given; no need to run it
        calls.append((t, kwargs))
        return torch.zeros_like(x)

    model.forward = spy
    policy = PositionPolicy("rolling", frames_per_block=2, window_frames=2, train_shift=3)
    loss_fn = FlowMatchingLoss(FlowLossConfig(shift=5.0), causal=True, frames_per_block=2, positions=policy)
    g = torch.Generator().manual_seed(2)
    b, k = 256, 3
    batch = {"latents": torch.randn(b, 4, 4, 4, 4, generator=g), "reference": torch.randn(b, 4, 1, 4, 4, generator=g),
             "text": torch.randn(b, 5, 32, generator=g), "motion": torch.randn(b, 4, k, 4, 4, generator=g)}
    loss_fn(model, batch, generator=torch.Generator().manual_seed(3))
    (t, kw), = calls
    motion_t = kw["motion_t"]
    assert motion_t.shape == (b, k) and motion_t.min() >= 0 and motion_t.max() <= 1000
    assert (motion_t[:, 0] != motion_t[:, 1]).all() and (motion_t[:, 1] != motion_t[:, 2]).all()
    # U[0, 1000], not the shift-5 table the clip draws from (which puts about 83% of its levels above 500).
    assert 0.4 < (motion_t < 500).float().mean() < 0.6 and (t < 500).float().mean() < 0.3
    assert 0.15 < (motion_t < 200).float().mean() < 0.25
    assert abs(torch.corrcoef(torch.stack([motion_t[:, 0], t[:, 0]]))[0, 1]) < 0.2
    assert kw["frame_pos"][:, 0].min() >= k  # the clip starts after its motion frames


def test_loss_noises_the_motion_frames_and_scores_the_clip_only():
    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config(reference="sink", frames_per_block=2)), std=0.1)
    policy = PositionPolicy("rolling", frames_per_block=2, window_frames=2, train_shift=3)
    loss_fn = FlowMatchingLoss(FlowLossConfig(drop_text=0.0, drop_audio=0.0), causal=True, frames_per_block=2,
                               positions=policy)
    g = torch.Generator().manual_seed(2)
    batch = {"latents": torch.randn(2, 4, 4, 4, 4, generator=g), "reference": torch.randn(2, 4, 1, 4, 4, generator=g),
             "text": torch.randn(2, 5, 32, generator=g), "motion": torch.randn(2, 4, 2, 4, 4, generator=g)}
    loss, _ = loss_fn(model, batch, generator=torch.Generator().manual_seed(3))

    # The same draws by hand: clip levels, clip noise, dropout, positions, then the motion frames' levels and noise.
    g = torch.Generator().manual_seed(3)
    t = loss_fn.noise_levels(2, 4, "cpu", g)
    noise = torch.randn(batch["latents"].shape, generator=g)
    loss_fn.drop_conditions(batch["text"], None, g)
    frame_pos, sink = policy.training_positions(2, 4, g, context=2)
    motion_t = torch.rand(2, 2, generator=g) * 1000
    motion_noise = torch.randn(batch["motion"].shape, generator=g)

    def noised(x0, eps, levels):
        s = (levels / 1000)[:, None, :, None, None]
        return (1 - s) * x0 + s * eps

    v = model(noised(batch["latents"], noise, t), t, batch["text"], causal=True, reference=batch["reference"],
              frame_pos=frame_pos, reference_pos=sink[..., None], window_blocks=1,
              motion=noised(batch["motion"], motion_noise, motion_t), motion_t=motion_t)
    assert v.shape == batch["latents"].shape
    torch.testing.assert_close(loss, (v - (noise - batch["latents"])).pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_the_teacher_refuses_motion_frames(tmp_path):
    model = AvatarDiT(tiny_config(reference="sink", frames_per_block=2))
    batch = {"latents": torch.randn(1, 4, 2, 4, 4), "reference": torch.randn(1, 4, 1, 4, 4),
             "text": torch.randn(1, 5, 32), "motion": torch.randn(1, 4, 2, 4, 4)}
    with pytest.raises(ValueError, match="teacher"):
        FlowMatchingLoss(FlowLossConfig(), causal=False, frames_per_block=2)(model, batch)
    cfg = compose_train("experiment=toy_teacher", *FAST, "data.motion_frames=3", f"run.dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match="teacher stage does not take them"):  # before the trainer starts
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# -------------------------------------------------------------------------------------------- train.py
def test_train_py_runs_diffusion_forcing_with_motion_frames(tmp_path):
    result = run_train("experiment=toy_df_motion", "init_from=null", *FAST, "trainer.max_steps=3",
                       f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.motion_frames == 3
    assert json.loads((tmp_path / "run" / "done.json").read_text())["final_loss"] > 0


@pytest.mark.meta
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_training_step_with_motion_frames_on_the_device(dtype):
    meta = torch.device("meta")
    cfg = DiTConfig.from_dict(dict(compose_train().model.dit))
    with meta:
        model = AvatarDiT(cfg).to(dtype).train()
    positions = PositionPolicy("rolling", cfg.frames_per_block, 3, train_shift=10)
    loss_fn = FlowMatchingLoss(FlowLossConfig(), causal=True, frames_per_block=cfg.frames_per_block,
                               positions=positions)
    frames, k = 2 * cfg.frames_per_block, 3
    batch = {
        "latents": torch.randn(2, cfg.in_dim, frames, 8, 8, device=meta),
        "reference": torch.randn(2, cfg.in_dim, 1, 8, 8, device=meta),
        "audio": torch.randn(2, frames * cfg.video_frames_per_latent, cfg.audio_layers_in, cfg.audio_feature_dim,
                             device=meta),
        "text": torch.randn(2, 4, cfg.text_dim, device=meta),
        "motion": torch.randn(2, cfg.in_dim, k, 8, 8, device=meta),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast(autocast_type(meta), dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, _ = loss_fn(model, batch)
    assert loss.device == meta and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.device == meta for p in model.blocks[0].parameters())
    optimizer.step()
