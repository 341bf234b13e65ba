"""trainer=fsdp (PyTorch FSDP2) on two CPU processes with gloo, launched by torchrun as on GPUs: a Stage 2 run split
over two ranks, killed and resumed, ends with the weights of one uninterrupted process with twice the batch; LoRA
roles sharded the same; Stage 1 trains and exports under FSDP."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liveavatar.models import AvatarDiT

from conftest import compose_in, one_thread, randomise, tiny_preset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Three blocks of three latent frames at 8x8 latents, through a one-block window; two layers. optim.eps=1 makes
# AdamW's update nearly linear in the gradient (m / (sqrt(v) + 1)), so rounding differences between the runs stay rounding-sized instead of
# being blown up to +-lr wherever a gradient is near zero (eps=1e-8 makes the first steps sign-like); the large
# learning rates make the change from the start weights large against rounding.
SMALL = ["model.dit.num_layers=2", "model.dit.audio_blocks=[0,1]", "model.resolution=[16,16]", "data.latent_frames=9",
         "model.window_blocks=1",  # three blocks through a one-block window: the rollouts evict history
         "distill.steps=[1000,500]", "distill.critic_steps_per_generator_step=1", "distill.ema_decay=null",
         "optim.eps=1.0", "optim.generator_lr=1.0", "optim.critic_lr=1.0", "progress=false"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("fsdp_checkpoints")
    cfg = tiny_preset()
    cfg.num_layers, cfg.audio_blocks = 2, [0, 1]
    for name, seed in (("generator", 1), ("teacher", 2)):
        torch.manual_seed(0)
        randomise(AvatarDiT(cfg), std=0.05, seed=seed).save_pretrained(folder / name)
    return [f"generator_from={folder / 'generator'}", f"teacher_from={folder / 'teacher'}"]


def run(script: str, *args: str, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    # One thread per process: two ranks on two cores.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / script), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=400)


def distill_in_process(*args: str) -> None:
    """The one-process reference run: what ``distill.py args`` runs, in this process on one thread (as the ranks
    run), without a fresh interpreter importing torch and Lightning again."""
    from liveavatar.training.distill_launch import distill

    cfg = compose_in("distill", args)
    with one_thread():
        distill(cfg, Path(cfg.run.dir))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AvatarDiT.from_pretrained(folder).state_dict()


def assert_same_training(got: Path, expected: Path, start: Path) -> None:
    """The two runs' exported weights agree to rounding, relative to how far training moved them."""
    a, b, s = weights(got), weights(expected), weights(start)
    assert a.keys() == b.keys()
    moved = max((b[k] - s[k]).abs().max().item() for k in b)
    differ = max((a[k] - b[k]).abs().max().item() for k in b)
    assert moved > 1e-3, moved
    assert differ < 1e-5 * moved, (differ, moved)


def test_fsdp_over_two_ranks_killed_and_resumed_equals_one_process_with_twice_the_batch(tmp_path, checkpoints):
    args = [*SMALL, *checkpoints, "trainer.max_steps=4", "run.checkpoint_every=2"]
    sharded = tmp_path / "sharded"
    killed = run("distill.py", *args, *FSDP, "data.batch_size=1", f"run.dir={sharded}", ranks=2,
                 env={"LIVEAVATAR_TRAIN_KILL_AT_STEP": "3"})
    assert killed.returncode != 0 and not (sharded / "model").exists(), killed.stderr[-2000:]
    resumed = run("distill.py", *args, *FSDP, "data.batch_size=1", f"run.dir={sharded}", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr

    one = tmp_path / "one"
    distill_in_process(*args, "data.batch_size=2", f"run.dir={one}")
    start = Path(checkpoints[0].split("=", 1)[1])
    assert_same_training(sharded / "model", one / "model", start)


def test_fsdp_lora_roles_equal_one_process(tmp_path, checkpoints):
    pytest.importorskip("peft")
    args = [*SMALL, *checkpoints, "trainer.max_steps=2", "lora.rank=4"]
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    done = run("distill.py", *args, *FSDP, "data.batch_size=1", f"run.dir={sharded}", ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    distill_in_process(*args, "data.batch_size=2", f"run.dir={one}")
    assert_same_training(sharded / "model", one / "model", Path(checkpoints[0].split("=", 1)[1]))
    assert not any("lora" in k for k in weights(sharded / "model"))  # exported merged, plain Wan names


def test_stage1_trains_and_exports_under_fsdp(tmp_path):
    out = tmp_path / "df"
    done = run("train.py", "experiment=toy_df", "init_from=null", "model.dit.num_layers=2",
               "model.dit.audio_blocks=[0,1]", "data.batch_size=1", "trainer.max_steps=2", "optim.warmup_steps=0",
               "progress=false", f"run.dir={out}", *FSDP, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = AvatarDiT.from_pretrained(out / "model")
    assert trained.config.num_layers == 2
    assert trained.head.head.weight.abs().max() > 0  # the zero-initialised head moved: the optimizer stepped
