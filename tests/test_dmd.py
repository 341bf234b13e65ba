"""Stage 2 (Self-Forcing DMD): the DMD gradient and the guided real score against hand computations, the step
counting of the two optimizers, NaN stops, distill.py end to end with a kill and resume, block-wise versus one-shot
generator gradients, LoRA roles over a shared base, a meta-device step and the 14B recipe built on meta."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from liveavatar.components import toy_preset
from liveavatar.models import AvatarDiT
from liveavatar.training.datamodule import ToyDataset, collate
from liveavatar.training.distill_launch import build_dmd_module, check_trainer, distill
from liveavatar.training.dmd import NonFiniteError
from liveavatar.training.dmd_loss import (Conditions, DMDLoss, DMDLossConfig, dmd_generator_loss, dmd_gradient,
                                         sid_generator_loss)
from liveavatar.training.ema import ParameterEMA

from conftest import randomise, tiny_config, tiny_preset

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# A small world for the runs: the tiny preset with 2 layers at 16x16 (8x8 latents), clips of 2 blocks.
SMALL = ["model.dit.num_layers=2", "model.dit.audio_blocks=[0,1]", "model.resolution=[16,16]",
         "data.latent_frames=6", "data.batch_size=1", "distill.critic_steps_per_generator_step=2",
         "distill.steps=[1000,500]", "trainer.log_every_n_steps=1", "progress=false"]


def small_config():
    cfg = tiny_preset()
    cfg.num_layers, cfg.audio_blocks = 2, [0, 1]
    return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A generator and a teacher with random non-zero weights (a fresh model's zero head predicts zeros)."""
    folder = tmp_path_factory.mktemp("dmd_checkpoints")
    out = {}
    for name, seed in (("generator", 1), ("teacher", 2)):
        torch.manual_seed(0)
        randomise(AvatarDiT(small_config()), std=0.05, seed=seed).save_pretrained(folder / name)
        out[name] = folder / name
    return out


def compose_distill(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("distill", overrides=list(overrides))


def run_distill(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "distill.py"), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def sources(checkpoints) -> list[str]:
    return [f"generator_from={checkpoints['generator']}", f"teacher_from={checkpoints['teacher']}"]


def load_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------- the losses
def test_dmd_gradient_and_loss_match_a_hand_computation():
    x = torch.tensor([1.0, 3.0, -2.0, 0.5]).reshape(2, 1, 1, 1, 2)
    real = torch.tensor([0.0, 1.0, -1.0, 0.5]).reshape(2, 1, 1, 1, 2)
    fake = torch.tensor([2.0, 2.0, 1.0, 1.5]).reshape(2, 1, 1, 1, 2)
    # clip 0: mean |x - real| = (1 + 2) / 2 = 1.5; clip 1: (1 + 0) / 2 = 0.5
    expected = torch.tensor([2 / 1.5, 1 / 1.5, 2 / 0.5, 1 / 0.5], dtype=torch.float64).reshape(2, 1, 1, 1, 2)
    grad = dmd_gradient(x, real, fake)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)

    leaf = x.clone().double().requires_grad_(True)
    loss = dmd_generator_loss(leaf, grad)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, 0.5 * expected.pow(2).mean(), rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(leaf.grad, expected / x.numel(), rtol=1e-12, atol=0)

    # A clip whose sample equals the real score has a zero normaliser: its gradient is zeroed, not infinite.
    same = dmd_gradient(real, real, fake)
    assert torch.isfinite(same).all() and same.abs().sum() == 0


def test_sid_loss_matches_a_hand_computation():
    x = torch.tensor([1.0, 3.0, -2.0, 0.5]).reshape(2, 1, 1, 1, 2)
    real = torch.tensor([0.0, 1.0, -1.0, 0.5]).reshape(2, 1, 1, 1, 2)
    fake = torch.tensor([2.0, 2.0, 1.0, 1.5]).reshape(2, 1, 1, 1, 2)
    # w: clip 0 mean |x - real| = 1.5, clip 1 = 0.5; real - fake = -2, -1 | -2, -1; real - x = -1, -2 | 1, 0
    alpha = 1.2
    terms = [(-2) * (-1 - alpha * -2) / 1.5, (-1) * (-2 - alpha * -1) / 1.5,
             (-2) * (1 - alpha * -2) / 0.5, (-1) * (0 - alpha * -1) / 0.5]
    leaf = x.clone().double().requires_grad_(True)
    loss = sid_generator_loss(leaf, real, fake, alpha)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(sum(terms) / 4, dtype=torch.float64), rtol=1e-12, atol=0)
    # With the scores held constant only (real - x) depends on x (w is held constant): d/dx = -(real - fake) / w.
    loss.backward()
    expected = torch.tensor([2 / 1.5, 1 / 1.5, 2 / 0.5, 1 / 0.5], dtype=torch.float64).reshape(2, 1, 1, 1, 2) / 4
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=0)


def test_sid_differentiates_through_both_scores_and_trains_neither():
    """float64: SiD's gradient at the video equals finite differences of its loss (same timestep and noise, the
    normaliser w held at its value, as SiD holds it), through the teacher's and the critic's forwards; with the
    scores held constant (DMD's stop) the derivative is another number. The teacher and the critic take no
    gradient and stay trainable."""
    module, batch = toy_module("distill.loss=sid", dtype=torch.float64)
    cond, fn = module.conditions(batch), module.loss_fn
    video = torch.randn(2, 12, 6, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t, noise = fn.draw(video, torch.Generator().manual_seed(11))

    def scores(x):
        xt = fn.flow.add_noise(x, noise, t)
        return fn.real_x0(module.real_score, xt, t, cond), fn.fake_x0(module.critic, xt, t, cond)

    with torch.no_grad():
        real0, fake0 = scores(video)
        w = (video - real0).abs().mean(dim=(1, 2, 3, 4), keepdim=True)

        def loss_with_w_held(x):
            real, fake = scores(x)
            return ((real - fake) * ((real - x) - 1.2 * (real - fake)) / w).mean()

        direction = torch.randn(video.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        # (the blocks compute their norms and modulation in float32, so the step cannot be tiny)
        eps = 1e-2
        numeric = (loss_with_w_held(video + eps * direction) - loss_with_w_held(video - eps * direction)) / (2 * eps)

    leaf = video.clone().requires_grad_(True)
    loss, _ = module.video_loss(leaf, batch, cond, torch.Generator().manual_seed(11))
    (grad,) = torch.autograd.grad(loss, leaf)
    # measured: 4e-5 relative to the central difference; holding the scores constant is 3 % off
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-3, atol=1e-12)

    stopped = video.clone().requires_grad_(True)
    (grad_stopped,) = torch.autograd.grad(sid_generator_loss(stopped, real0, fake0, 1.2), stopped)
    assert abs(float((grad_stopped * direction).sum()) - float(numeric)) > 1e-2 * abs(float(numeric))
    assert all(p.grad is None and p.requires_grad for p in module.critic.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    with pytest.raises(ValueError, match="distill.loss must be one of dmd, sid"):
        build_dmd_module(compose_distill(*SMALL, "distill.loss=adversarial"))


def test_real_score_is_cond_plus_guidance_times_cond_minus_uncond():
    cfg = tiny_config(in_dim=4, out_dim=4, reference="sink", audio_dim=16, audio_feature_dim=8, audio_layers_in=1,
                      audio_blocks=[0, 1], video_frames_per_latent=1)
    teacher = randomise(AvatarDiT(cfg), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(2, 4, 4, 4, 4, generator=g)
    t = torch.tensor([300.0, 800.0])
    text = torch.randn(2, 8, 32, generator=g)
    audio = torch.randn(2, 4, 1, 1, 8, generator=g)
    reference = torch.randn(2, 4, 1, 4, 4, generator=g)
    loss = DMDLoss(DMDLossConfig(guidance_scale=2.5, shift=1.0))
    with torch.no_grad():
        got = loss.real_x0(teacher, xt, t, Conditions(text, audio, reference))
        v_cond = teacher(xt, t, text, audio, reference=reference)
        v_uncond = teacher(xt, t, torch.zeros_like(text), torch.zeros_like(audio), reference=reference)
    sigma = (t / 1000).reshape(2, 1, 1, 1, 1)
    cond, uncond = xt - sigma * v_cond, xt - sigma * v_uncond
    assert (cond - uncond).abs().max() > 1e-3  # text and audio matter to this teacher
    torch.testing.assert_close(got, cond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)

    unguided = DMDLoss(DMDLossConfig(guidance_scale=0.0, shift=1.0))
    with torch.no_grad():
        torch.testing.assert_close(unguided.real_x0(teacher, xt, t, Conditions(text, audio, reference)), cond,
                                   rtol=1e-5, atol=1e-5)


def test_timesteps_stay_inside_the_clamped_shifted_range():
    loss = DMDLoss(DMDLossConfig(shift=5.0, min_t=20, max_t=980))
    t = loss.sample_timesteps(4000, torch.Generator().manual_seed(0), "cpu")
    lo, hi = loss.flow.timesteps[1000 - 20], loss.flow.timesteps[1000 - 980]
    assert t.min() >= lo - 1e-4 and t.max() <= hi + 1e-4
    assert t.median() > 600  # shift 5 spends most levels at high noise
    with pytest.raises(ValueError, match="min_t"):
        DMDLossConfig(min_t=500, max_t=100)


def test_ema_moves_each_trained_parameter_toward_the_model():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    ema = ParameterEMA(model, 0.9)
    assert ema.names == ["weight"]
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.weight, start + 0.1)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, start + 0.1)
    ema.to(torch.bfloat16)  # a bf16-true module keeps float32 averages
    assert ema.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------- the module
def toy_module(*overrides, dtype=torch.float32, randomised=True):
    cfg = compose_distill(*SMALL, *overrides)
    module = build_dmd_module(cfg)
    module.configure_model()
    for i, m in enumerate((module.generator, module.critic, module.teacher)):
        if m is not None and randomised:
            randomise(m, std=0.05, seed=i + 1)
    module.to(dtype)
    data = ToyDataset(10, 6, module.dit_config, preset=toy_preset(module.dit_config, resolution=(16, 16)))
    batch = collate([data[i] for i in range(2)])
    return module, {k: v.to(dtype) for k, v in batch.items()}


def generator_grads(module, batch, blockwise: bool, step: int) -> dict[str, torch.Tensor]:
    module.settings.blockwise = blockwise
    module.generator.zero_grad(set_to_none=True)
    module.generator_backward(batch, module.conditions(batch), step)
    return {n: p.grad.clone() for n, p in module.generator.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_blockwise_and_one_shot_generator_steps_give_the_same_gradient(loss):
    """float64, two clips of two blocks: the DMD (or SiD) gradient pushed back block by block equals the one-shot
    backward to rounding (the rollouts, exit step and loss noise are drawn from the same seeds in both)."""
    module, batch = toy_module("distill.steps=[1000,750,500]", f"distill.loss={loss}", dtype=torch.float64)
    substep = module.settings.critic_steps_per_generator_step
    step = next(s for s in range(50) if module.exit_step(s, substep) > 0)  # no-grad steps before the exit
    one_shot = generator_grads(module, batch, blockwise=False, step=step)
    blockwise = generator_grads(module, batch, blockwise=True, step=step)
    assert one_shot.keys() == blockwise.keys() and len(one_shot) > 10
    assert any(g.abs().max() > 0 for g in one_shot.values())
    for name in one_shot:
        torch.testing.assert_close(blockwise[name], one_shot[name], rtol=1e-7, atol=1e-12, msg=name)
    assert all(p.grad is None for p in module.critic.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_a_run_counts_generator_steps_and_steps_the_critic_each_time(tmp_path, checkpoints):
    run = tmp_path / "run"
    cfg = compose_distill(*SMALL, *sources(checkpoints), "distill.critic_steps_per_generator_step=3",
                          "trainer.max_steps=2", "run.checkpoint_every=1", f"run.dir={run}")
    done = distill(cfg, run)
    assert done["steps"] == 2 and done["stage"] == "dmd" and done["final_loss"] is not None
    state = load_state(run)
    assert state["global_step"] == 2
    generator_opt, critic_opt = state["optimizer_states"]
    assert {float(s["step"]) for s in generator_opt["state"].values()} == {2.0}
    assert {float(s["step"]) for s in critic_opt["state"].values()} == {6.0}   # 3 critic steps per generator step
    assert generator_opt["param_groups"][0]["lr"] == 1e-5 and critic_opt["param_groups"][0]["lr"] == 2e-6
    assert generator_opt["param_groups"][0]["betas"] == (0.0, 0.999)
    # The exported model is the generator's EMA, loadable as a plain checkpoint.
    exported = AvatarDiT.from_pretrained(run / "model")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][f"ema.{name.replace('.', '__')}"])
    teacher = AvatarDiT.from_pretrained(checkpoints["teacher"])
    for name, value in teacher.state_dict().items():  # the teacher never moves
        torch.testing.assert_close(state["state_dict"][f"teacher.{name}"], value)
    assert json.loads((run / "done.json").read_text())["steps"] == 2


def test_a_nan_in_the_generator_loss_stops_before_its_step(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_DISTILL_NAN_AT", "generator:1")
    run = tmp_path / "run"
    cfg = compose_distill(*SMALL, *sources(checkpoints), "distill.critic_steps_per_generator_step=1",
                          "trainer.max_steps=3", "run.checkpoint_every=1", f"run.dir={run}")
    with pytest.raises(NonFiniteError, match="non-finite generator loss or gradient at generator step 1"):
        distill(cfg, run)
    state = load_state(run)
    assert state["global_step"] == 1   # the checkpoint of step 0's end; nothing after the NaN
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (run / "model").exists() and not (run / "done.json").exists()


def test_distill_refuses_what_two_optimizers_cannot_use_in_one_line(tmp_path, checkpoints):
    for overrides, message in [(["trainer=deepspeed_zero2"], "single optimizer"),
                               (["trainer.gradient_clip_val=1.0"], "optim.clip_grad_norm"),
                               (["trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
                               (["trainer=fsdp"], "distill.ema_decay=null")]:
        with pytest.raises(ValueError, match=message):
            check_trainer(compose_distill(*overrides))
    refused = run_distill("trainer=deepspeed_zero2", f"run.dir={tmp_path / 'r'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: trainer=deepspeed_*")
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "checkpoints").exists()


def test_a_nan_in_the_critic_loss_exits_with_one_line_and_no_new_checkpoint(tmp_path, checkpoints):
    run = tmp_path / "run"
    result = run_distill(*SMALL, *sources(checkpoints), "trainer.max_steps=3", "run.checkpoint_every=1",
                         f"run.dir={run}", env={"LIVEAVATAR_DISTILL_NAN_AT": "critic:1"})
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: non-finite critic loss or gradient at generator step 1")
    assert load_state(run)["global_step"] == 1
    assert not (run / "model").exists()


@pytest.mark.slow
def test_distill_runs_end_to_end_and_resumes_after_a_kill(tmp_path, checkpoints, caplog):
    run = tmp_path / "run"
    args = [*SMALL, *sources(checkpoints), "trainer.max_steps=4", "run.checkpoint_every=2", f"run.dir={run}"]
    killed = run_distill(*args, env={"LIVEAVATAR_TRAIN_KILL_AT_STEP": "3"})  # the drill kills its own process
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert load_state(run)["global_step"] == 2           # at most one checkpoint interval lost
    assert not (run / "model").exists()

    # The same command again, in this process (distill.py's main runs distill(cfg, run.dir)).
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        distill(compose_distill(*args), run)
    assert "resuming" in caplog.text
    assert load_state(run)["global_step"] == 4
    assert json.loads((run / "done.json").read_text())["steps"] == 4
    model = AvatarDiT.from_pretrained(run / "model")
    assert model.config.num_layers == 2
    assert (run / "config.yaml").is_file() and list((run / "logs" / "csv").rglob("metrics.csv"))


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_roles_share_the_teacher_base_and_export_merged(tmp_path, checkpoints):
    pytest.importorskip("peft")
    module, batch = toy_module(*sources(checkpoints), "lora.rank=4", randomised=False)
    assert module.teacher is None
    critic_trained = [n for n, p in module.critic.named_parameters() if p.requires_grad]
    assert critic_trained and all("lora_" in n for n in critic_trained)    # the shared base stays the teacher's
    generator_trained = [n for n, p in module.generator.named_parameters() if p.requires_grad]
    assert any("audio_attn" in n for n in generator_trained) and any("lora_" in n for n in generator_trained)

    teacher = AvatarDiT.from_pretrained(checkpoints["teacher"]).eval()
    with torch.no_grad():
        for n, p in module.critic.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)   # a trained critic adapter
    cond = module.conditions(batch)
    xt, t = batch["latents"], torch.tensor([400.0, 700.0])
    with torch.no_grad():
        view = module.loss_fn.real_x0(module.real_score, xt, t, cond)
        plain = module.loss_fn.real_x0(teacher, xt, t, cond)
        critic = module.loss_fn.fake_x0(module.critic, xt, t, cond)
    torch.testing.assert_close(view, plain, rtol=1e-5, atol=1e-5)   # the teacher is the base, adapters off
    assert (critic - plain).abs().max() > 1e-3
    assert all(p.requires_grad for n, p in module.critic.named_parameters() if "lora_" in n)  # switched back on
    exported = module.export()
    assert not any("lora_" in n for n in exported.state_dict())


# -------------------------------------------------------------------------------------------- devices
def meta_batch(dit, clips: int = 2, frames: int = 6) -> dict:
    """A training batch of ``clips`` clips of ``frames`` latent frames (8x8) on the meta device."""
    meta = torch.device("meta")
    return {"latents": torch.zeros(clips, dit.in_dim, frames, 8, 8, device=meta),
            "reference": torch.zeros(clips, dit.in_dim, 1, 8, 8, device=meta),
            "audio": torch.zeros(clips, frames * dit.video_frames_per_latent, dit.audio_layers_in, dit.audio_feature_dim,
                                 device=meta),
            "text": torch.zeros(clips, dit.text_len, dit.text_dim, device=meta)}


@pytest.mark.meta
@pytest.mark.parametrize("blockwise", [False, True], ids=["one_shot", "blockwise"])
def test_one_generator_and_critic_step_on_the_meta_device(blockwise):
    cfg = compose_distill(*SMALL, "model.dit.num_layers=4", "model.dit.audio_blocks=[0,1,2,3]",
                          f"distill.blockwise={blockwise}")
    module = build_dmd_module(cfg)
    meta = torch.device("meta")
    with meta:
        module.configure_model()
    batch = meta_batch(module.dit_config)
    cond = module.conditions(batch)
    module.critic_loss(batch, cond, 0, 0).backward()
    assert all(p.grad is not None and p.grad.device == meta for p in module.critic.blocks[0].parameters())
    loss, _ = module.generator_backward(batch, cond, 0)
    assert loss.device == meta and loss.dtype == torch.float64
    assert all(p.grad is not None and p.grad.device == meta for p in module.generator.blocks[0].parameters())


@pytest.mark.meta
def test_the_s2v_family_distills_on_the_meta_device():
    # Stage 2 on a Wan2.2-S2V model: the rollout streams each block's audio through the S2V encoder and injector,
    # the teacher and critic take the clip's audio paired 4 video frames per latent frame. tiny-s2v streams with
    # the sink's motion tokens (model.sink_motion): the rollout's sink and the critic's forward take them.
    cfg = compose_distill(*SMALL, "model=tiny-s2v", "model.dit.audio_blocks=[0,1]")
    module = build_dmd_module(cfg)
    with torch.device("meta"):
        module.configure_model()
    assert module.dit_config.family == "s2v" and module.engine_settings.sink_motion
    batch = meta_batch(module.dit_config)
    with pytest.raises(ValueError, match="needs the motion latents"):
        module.generator_backward(batch, module.conditions(batch), 0)
    batch["sink_motion"] = torch.zeros(2, module.dit_config.in_dim, 19, 8, 8, device="meta")
    cond = module.conditions(batch)
    assert cond.audio.shape[1:3] == (6, 4)  # latent frames, video frames each
    module.critic_loss(batch, cond, 0, 0).backward()
    for part in (module.critic.audio_injector, module.critic.frame_packer):
        assert all(p.grad is not None for p in part.parameters())
    module.generator_backward(batch, cond, 0)
    for part in (module.generator.casual_audio_encoder, module.generator.audio_injector):
        assert all(p.grad is not None and p.grad.device.type == "meta" for p in part.parameters())


@pytest.mark.meta
def test_the_14b_recipe_builds_lora_roles_on_the_meta_device():
    pytest.importorskip("peft")
    cfg = compose_distill("experiment=liveavatar_14b_dmd", "generator_from=null", "teacher_from=null",
                          "data.path=/shards")
    assert cfg.trainer.strategy.name == "fsdp" and cfg.trainer.precision == "bf16-true"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.trainer.max_steps) == (128, 64, 500)
    assert (cfg.optim.generator_lr, cfg.optim.critic_lr) == (1e-5, 2e-6)
    check_trainer(cfg)
    module = build_dmd_module(cfg)
    with torch.device("meta"):
        module.configure_model()
    assert module.teacher is None and module.ema is None
    total = sum(p.numel() for p in module.critic.parameters())
    trained = sum(p.numel() for p in module.critic.parameters() if p.requires_grad)
    assert total > 1.4e10 and 0 < trained < 0.05 * total
