"""Stage 2's ODE initialisation (``distill.py stage=ode_init``): the dense schedule passes through the student's steps,
the teacher's trajectory equals an independently written Euler loop on the velocity, each block takes the state of
its own drawn step, a few steps pull the student onto the trajectories, distill.py runs it end to end, and one step
runs on the meta device."""
from __future__ import annotations

import pytest
import torch

from liveavatar.components import toy_preset
from liveavatar.diffusion.flow import FlowSchedule
from liveavatar.training.datamodule import ToyDataset, collate
from liveavatar.training.distill_launch import build_ode_module, distill
from liveavatar.training.dmd_loss import batch_conditions
from liveavatar.training.ode_init import _pick_states, dense_schedule, teacher_trajectory

from conftest import randomise
from test_dmd import SMALL, compose_distill, meta_batch, sources
from test_dmd import checkpoints  # noqa: F401


def test_the_dense_schedule_passes_through_every_student_step_and_ends_clean():
    flow = FlowSchedule(5.0)
    student = flow.warp([1000.0, 750.0, 500.0, 250.0]).float()
    dense, keep = dense_schedule(student, 3)
    assert len(dense) == 13 and float(dense[-1]) == 0.0
    torch.testing.assert_close(dense[keep], student)
    assert bool((dense[1:] < dense[:-1]).all())


def test_the_teacher_trajectory_equals_an_euler_loop_on_the_guided_velocity():
    """The trajectory keeps x0 and eps between levels; written independently here as Euler steps of
    dx/dsigma = v = eps - x0 with the velocity of the guided estimate."""
    torch.manual_seed(0)
    flow = FlowSchedule(3.0)
    target = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64)

    def guided_x0(x, t):  # any smooth denoiser of x and t
        s = flow.sigma(t).view(-1, 1, 1, 1, 1).double()
        return (1 - s) * target + s * torch.tanh(x.double())

    student = flow.warp([1000.0, 600.0, 300.0]).float()
    dense, keep = dense_schedule(student, 4)
    noise = torch.randn_like(target)
    states, end = teacher_trajectory(guided_x0, noise.double(), dense, keep, flow)
    x, expected = noise.clone(), []
    for i in range(len(dense) - 1):
        if i in keep:
            expected.append(x.clone())
        t = dense[i].expand(2)
        sigma, sigma_next = float(flow.sigma(dense[i])), float(flow.sigma(dense[i + 1]))
        v = (x - guided_x0(x, t)) / sigma   # eps - x0
        x = x + (sigma_next - sigma) * v
    torch.testing.assert_close(states, torch.stack(expected).to(states.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(end, x.to(end.dtype), rtol=1e-5, atol=1e-6)
    assert float(flow.sigma(dense[0])) == pytest.approx(1.0, abs=1e-3)


def test_each_block_takes_the_state_of_its_own_step():
    states = torch.arange(3)[:, None, None, None, None, None].float().expand(3, 2, 1, 6, 1, 1).clone()
    pick = torch.tensor([[0, 0, 2, 2, 1, 1], [1, 1, 1, 1, 0, 0]])
    picked = _pick_states(states, pick)
    assert picked.shape == (2, 1, 6, 1, 1)
    assert picked[:, 0, :, 0, 0].tolist() == pick.float().tolist()


def ode_module(*overrides):
    cfg = compose_distill(*SMALL, "stage=ode_init", *overrides)
    module = build_ode_module(cfg)
    module.configure_model()
    randomise(module.generator, std=0.05, seed=1)
    randomise(module.teacher, std=0.05, seed=2)
    data = ToyDataset(10, 6, module.dit_config, preset=toy_preset(module.dit_config, resolution=(16, 16)))
    return module, collate([data[i] for i in range(2)])


def test_a_few_steps_pull_the_student_onto_the_teacher_trajectories():
    module, batch = ode_module("optim.generator_lr=3e-3")
    before = float(module.step_loss(batch, 0).detach())
    opt = torch.optim.Adam(module.generator.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        module.step_loss(batch, 0).backward()  # the same trajectories and picks each time
        opt.step()
    after = float(module.step_loss(batch, 0).detach())
    assert after < 0.7 * before, (before, after)
    assert all(p.grad is None for p in module.teacher.parameters())


def test_distill_runs_the_ode_stage_and_exports_a_student(tmp_path, checkpoints):  # noqa: F811
    run = tmp_path / "ode"
    cfg = compose_distill(*SMALL, *sources(checkpoints), "stage=ode_init", "trainer.max_steps=2",
                          "ode.substeps=2", f"run.dir={run}")
    done = distill(cfg, run)
    assert done["stage"] == "ode_init" and done["steps"] == 2 and done["final_loss"] is not None
    assert (run / "model").is_dir() and (run / "loss.png").exists()
    with pytest.raises(ValueError, match="stage=sid"):
        distill(compose_distill(*SMALL, "stage=sid", f"run.dir={tmp_path / 'x'}"), tmp_path / "x")


@pytest.mark.meta
def test_one_ode_init_step_on_the_meta_device():
    cfg = compose_distill(*SMALL, "stage=ode_init")
    module = build_ode_module(cfg)
    meta = torch.device("meta")
    with meta:
        module.configure_model()
    batch = meta_batch(module.dit_config)
    assert batch_conditions(batch, module.dit_config).audio.device == meta
    loss = module.step_loss(batch, 0)
    loss.backward()
    assert loss.device == meta
    assert all(p.grad is not None and p.grad.device == meta for p in module.generator.blocks[0].parameters())


def test_a_training_checkpoint_streams_as_the_model_its_run_exports(tmp_path, checkpoints):  # noqa: F811
    """The Stage 2 .ckpt turns into the generator's EMA, exactly the run's model/ export; LoRA and foreign files
    are refused in one line."""
    from liveavatar.models import AvatarDiT
    from liveavatar.training.export import TrainingCheckpointError, model_from_training_checkpoint

    run = tmp_path / "dmd"
    distill(compose_distill(*SMALL, *sources(checkpoints), "trainer.max_steps=2", "distill.ema_decay=0.5",
                            f"run.dir={run}"), run)
    from_ckpt = model_from_training_checkpoint(run / "checkpoints" / "last.ckpt")
    exported = AvatarDiT.from_pretrained(run / "model")
    generator = model_from_training_checkpoint(run / "checkpoints" / "last.ckpt", ema=False)
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(from_ckpt.state_dict()[name], value, msg=name)
    assert any(not torch.equal(generator.state_dict()[n], v) for n, v in exported.state_dict().items())
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingCheckpointError, match="not a train.py"):
        model_from_training_checkpoint(tmp_path / "junk.ckpt")
