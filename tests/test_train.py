"""Stage 0/1 training: the loss, the module, the run folder (resume, refusal), loggers, sweeps, LoRA, configs."""
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
from omegaconf import OmegaConf

from liveavatar.data.toy import make_clip, mouth_region
from liveavatar.models import AvatarDiT
from liveavatar.training.datamodule import ToyDataset, collate
from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss
from liveavatar.training.launch import read_losses, train
from liveavatar.training.lora import LoraSettings, apply_lora, merged_copy
from liveavatar.training.run_folder import RunFolder, RunFolderError, flatten_config
from liveavatar.training.strategy import build_strategy, sharded_strategy, strategy_name

from conftest import randomise, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# A small, fast run: 3 latent frames (one block), batch 2.
FAST = ["data.latent_frames=3", "data.batch_size=2", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
        "run.checkpoint_every=2", "progress=false"]


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_train(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def toy_batch(dit, frames=3, batch=2):
    data = ToyDataset(100, frames, dit)
    return collate([data[i] for i in range(batch)])


# ------------------------------------------------------------------------------------------------ the loss
def test_noise_levels_per_clip_for_the_teacher_and_per_block_for_diffusion_forcing():
    g = torch.Generator().manual_seed(0)
    teacher = FlowMatchingLoss(FlowLossConfig(), causal=False, frames_per_block=3)
    t = teacher.noise_levels(4, 9, "cpu", g)
    assert t.shape == (4, 9) and torch.all(t == t[:, :1])
    df = FlowMatchingLoss(FlowLossConfig(), causal=True, frames_per_block=3)
    t = df.noise_levels(64, 9, "cpu", g)
    blocks = t.reshape(64, 3, 3)
    assert torch.all(blocks == blocks[:, :, :1])             # one level per block
    assert (blocks[:, 0, 0] != blocks[:, 1, 0]).float().mean() > 0.9   # independent across blocks
    assert t.min() >= 0 and t.max() <= 1000
    with pytest.raises(ValueError, match="blocks of 3"):
        df.noise_levels(1, 4, "cpu")


def test_condition_dropout_zeroes_whole_clips():
    g = torch.Generator().manual_seed(0)
    loss = FlowMatchingLoss(FlowLossConfig(drop_text=1.0, drop_audio=0.0), causal=False, frames_per_block=1)
    text, audio = loss.drop_conditions(torch.ones(3, 4, 5), torch.ones(3, 6, 1, 2), g)
    assert text.abs().sum() == 0 and torch.all(audio == 1)
    loss = FlowMatchingLoss(FlowLossConfig(drop_text=0.5, drop_audio=0.5), causal=False, frames_per_block=1)
    text, audio = loss.drop_conditions(torch.ones(400, 2, 2), torch.ones(400, 3, 1, 2), g)
    per_clip = text.sum(dim=(1, 2))
    assert set(per_clip.unique().tolist()) == {0.0, 4.0}       # all or nothing per clip
    assert 0.35 < (per_clip == 0).float().mean() < 0.65
    with pytest.raises(ValueError):
        FlowLossConfig(drop_text=1.5)


@pytest.mark.parametrize("causal", [False, True])
def test_loss_equals_the_velocity_mse_of_a_direct_forward(causal):
    dit = tiny_config(in_dim=12, out_dim=12, text_dim=32, text_len=16, frames_per_block=3, reference="concat",
                      audio_dim=16, audio_feature_dim=32, audio_layers_in=1, audio_blocks=[0, 1])
    model = randomise(AvatarDiT(dit), 0.05)
    batch = toy_batch(dit, frames=6)
    cfg = FlowLossConfig(drop_text=0.0, drop_audio=0.0)
    loss_fn = FlowMatchingLoss(cfg, causal=causal, frames_per_block=3)
    loss, _ = loss_fn(model, batch, torch.Generator().manual_seed(3))

    # The same draws, by hand: timesteps first, then the noise.
    g = torch.Generator().manual_seed(3)
    t = loss_fn.noise_levels(2, 6, "cpu", g)
    noise = torch.randn(batch["latents"].shape, generator=g)
    sigma = (t / 1000)[:, None, :, None, None]
    xt = (1 - sigma) * batch["latents"] + sigma * noise
    v = model(xt, t, batch["text"], batch["audio"], causal=causal, reference=batch["reference"])
    expected = (v - (noise - batch["latents"])).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dit):
    model = tiny_dit(reference="sink")
    x, t, ctx = torch.randn(1, 4, 4, 4, 4), torch.rand(1, 4) * 1000, torch.randn(1, 8, 32)
    ref = torch.randn(1, 4, 1, 4, 4)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, ctx, causal=True, reference=ref).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------- data
def test_toy_dataset_is_deterministic_and_fits_the_model():
    dit = tiny_config(in_dim=12, out_dim=12, text_dim=32, text_len=16, audio_dim=16, audio_feature_dim=32,
                      audio_layers_in=1, audio_blocks=[0])
    data = ToyDataset(10, 6, dit)
    a, b = data[3], data[3]
    assert a["latents"].shape == (12, 6, 16, 16) and a["reference"].shape == (12, 1, 16, 16)
    assert a["audio"].shape == (6, 1, 32) and a["text"].shape == (16, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(data[4]["latents"], a["latents"])
    with pytest.raises(ValueError, match="n_mels"):
        ToyDataset(10, 6, tiny_config(in_dim=12, out_dim=12, audio_dim=16, audio_feature_dim=20, audio_blocks=[0]))
    with pytest.raises(ValueError, match="in_dim"):
        ToyDataset(10, 6, tiny_config(in_dim=4, out_dim=4))


# -------------------------------------------------------------------------------------------- train runs
@pytest.mark.slow
def test_training_lowers_the_loss_and_exports_a_loadable_checkpoint(tmp_path):
    cfg = compose_train("experiment=toy_teacher", "data.batch_size=4", "data.latent_frames=3",
                        "trainer.max_steps=60", "trainer.log_every_n_steps=1", "optim.warmup_steps=5",
                        "run.checkpoint_every=100", "progress=false", f"run.dir={tmp_path / 'run'}")
    done = train(cfg, tmp_path / "run")
    assert done["steps"] == 60
    steps, losses = read_losses(tmp_path / "run" / "logs" / "csv")
    assert len(losses) >= 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    model = AvatarDiT.from_pretrained(tmp_path / "run" / "model")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 60
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][f"model.{name}"])
    assert json.loads((tmp_path / "run" / "done.json").read_text())["steps"] == 60
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_the_exported_model_is_the_ema_of_the_weights_after_each_optimizer_step(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from liveavatar.training.launch import build_module

    cfg = compose_train("experiment=toy_df", "init_from=null", "data.latent_frames=3", "optim.ema_decay=0.6",
                        "optim.lr=1e-2")
    module = build_module(cfg)
    start, seen = {}, []

    def params(pl_module):
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            start.update(params(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, params(pl_module)))

    data = DataLoader(ToyDataset(8, 3, module.dit_config), batch_size=2, collate_fn=collate)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        accumulate_grad_batches=2, default_root_dir=tmp_path)
    trainer.fit(module, data)
    # Two batches per optimizer step: the average moves once per step (the first batch of a step changes nothing).
    assert [step for step, _ in seen] == [0, 1, 1, 2, 2, 3]
    after_steps = [p for i, (step, p) in enumerate(seen) if step > 0 and step != seen[i - 1][0]]
    assert len(after_steps) == 3
    exported = module.export()
    final = dict(module.model.named_parameters())
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-3
    averaged = dict(module.ema.named_buffers())
    for name, value in exported.named_parameters():
        expected = start[name]
        for p in after_steps:
            expected = 0.6 * expected + 0.4 * p[name]
        torch.testing.assert_close(value, expected, msg=name)
        torch.testing.assert_close(averaged[name.replace(".", "__")], expected, msg=name)


def test_a_killed_run_continues_from_its_last_checkpoint_with_the_same_command(tmp_path, caplog):
    args = ["experiment=toy_df", "init_from=null", *FAST, "trainer.max_steps=5", f"run.dir={tmp_path / 'run'}"]
    killed = run_train(*args, env={"LIVEAVATAR_TRAIN_KILL_AT_STEP": "3"})  # the drill kills its own process
    assert killed.returncode == 137, killed.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2                      # the checkpoint before the kill
    assert not (tmp_path / "run" / "model").exists()

    # The same command again, in this process (train.py's main runs train(cfg, run.dir)).
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        train(compose_train(*args), tmp_path / "run")
    assert "resuming" in caplog.text
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    assert json.loads((tmp_path / "run" / "done.json").read_text())["steps"] == 5
    steps, _ = read_losses(tmp_path / "run" / "logs" / "csv")
    assert steps[-1] == 4 and 2 in steps                  # logged steps 0..4 across both launches


def test_a_folder_holding_another_run_is_refused_in_one_line(tmp_path):
    # The two runs in this process (train.py's main calls train(cfg, run.dir)); the refusals through train.py.
    run_dir = tmp_path / "run"
    train(compose_train("experiment=toy_teacher", *FAST, "trainer.max_steps=2", f"run.dir={run_dir}"), run_dir)
    before = (run_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    other = run_train("experiment=toy_teacher", *FAST, "trainer.max_steps=2", "optim.lr=0.5", f"run.dir={run_dir}")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: run.dir=")
    assert "optim.lr" in other.stderr and "Traceback" not in other.stderr
    assert (run_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    train(compose_train("experiment=toy_teacher", *FAST, "trainer.max_steps=2", "optim.lr=0.5", "run.overwrite=true",
                        f"run.dir={run_dir}"), run_dir)
    assert OmegaConf.load(run_dir / "config.yaml").optim.lr == 0.5

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    refused = run_train("experiment=toy_teacher", *FAST, f"run.dir={tmp_path / 'plain'}")
    assert refused.returncode == 2 and "not a training run" in refused.stderr
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"


def test_bad_choices_and_missing_teacher_are_one_line_errors(tmp_path):
    unknown = run_train("experiment=nope")
    known = ", ".join(sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
    assert {"liveavatar_14b_df", "toy_df", "toy_teacher"} <= set(known.split(", "))
    assert unknown.returncode == 2 and unknown.stderr.strip() == f"error: experiment=nope: unknown; choose one of {known}"
    missing = run_train("experiment=toy_df", *FAST, f"init_from={tmp_path / 'absent'}", f"run.dir={tmp_path / 'r'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error:")
    sharded_ema = run_train("experiment=toy_df", *FAST, "trainer=fsdp", "optim.ema_decay=0.99",
                            f"run.dir={tmp_path / 'e'}")
    assert sharded_ema.returncode == 2 and sharded_ema.stderr.strip().startswith("error: optim.ema_decay with "
                                                                                 "trainer=fsdp")


def test_ema_is_refused_in_one_line_under_the_strategies_that_shard_parameters(tmp_path):
    # train.py and distill.py read the strategy through the same helpers.
    expected = {"cpu": ("auto", None), "gpu": ("ddp", None), "fsdp": ("fsdp", "fsdp"),
                "deepspeed_zero2": ("deepspeed", None), "deepspeed_zero3": ("deepspeed", "deepspeed_zero3")}
    for preset, (name, sharded) in expected.items():
        trainer = compose_train("experiment=toy_df", f"trainer={preset}").trainer
        assert (strategy_name(trainer), sharded_strategy(trainer)) == (name, sharded), preset
    assert strategy_name({}) == "auto" and sharded_strategy({}) is None
    for preset in ("fsdp", "deepspeed_zero3"):
        cfg = compose_train("experiment=toy_df", f"trainer={preset}", "optim.ema_decay=0.99")
        with pytest.raises(ValueError) as refused:
            train(cfg, tmp_path / preset)
        message = str(refused.value)
        assert message.startswith(f"optim.ema_decay with trainer={preset}: ") and "\n" not in message
        assert message.endswith("set optim.ema_decay=null") and not (tmp_path / preset).exists()
    from liveavatar.training.distill_launch import check_trainer

    with initialize_config_dir(str(CONF), version_base="1.3"):
        distill = [compose("distill", overrides=["trainer=fsdp", f"distill.ema_decay={d}"]) for d in ("0.99", "null")]
    with pytest.raises(ValueError, match=r"^distill\.ema_decay with trainer=fsdp: .*set distill\.ema_decay=null$"):
        check_trainer(distill[0])
    check_trainer(distill[1])

def test_sweep_runs_each_job_in_its_own_folder_and_loggers_write(tmp_path):
    result = run_train("-m", "experiment=toy_teacher", *FAST, "trainer.max_steps=2", "model.rope.policy=absolute,rolling",
                       "logger=tensorboard", f"run.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all("model.rope.policy=" in j for j in jobs), jobs
    for job in jobs:
        folder = tmp_path / "sweep" / job
        assert (folder / "model" / "config.json").is_file()
        assert list((folder / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
        assert list((folder / "logs" / "csv").rglob("metrics.csv"))
    policies = {OmegaConf.load(tmp_path / "sweep" / j / "config.yaml").model.rope.policy for j in jobs}
    assert policies == {"absolute", "rolling"}


def test_wandb_logs_offline_without_network(tmp_path):
    pytest.importorskip("wandb")
    result = run_train("experiment=toy_teacher", *FAST, "trainer.max_steps=2", "logger=wandb",
                       f"run.dir={tmp_path / 'run'}", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))


# -------------------------------------------------------------------------------------------- run folder
def test_run_folder_allows_a_longer_run_but_not_a_different_one(tmp_path):
    cfg = compose_train("experiment=toy_teacher")
    folder = RunFolder(tmp_path / "r")
    assert folder.prepare(cfg) is None
    folder.checkpoints.mkdir()
    folder.last_checkpoint.write_bytes(b"x")
    longer = compose_train("experiment=toy_teacher", "trainer.max_steps=5000")
    assert folder.prepare(longer) == folder.last_checkpoint
    with pytest.raises(RunFolderError, match="run.resume=true"):
        folder.prepare(longer, resume=False)
    with pytest.raises(RunFolderError, match="loss.shift"):
        folder.prepare(compose_train("experiment=toy_teacher", "loss.shift=3"))


def test_flatten_config_gives_dotted_keys_and_keeps_empty_mappings_and_lists_whole():
    nested = {"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "lora": {}, "model": {"dit": {"dim": 48}}, "seed": 0}
    assert flatten_config(nested) == {"optim.lr": 1e-4, "optim.betas": [0.9, 0.99], "lora": {}, "model.dit.dim": 48,
                                      "seed": 0}
    assert flatten_config({"dit": {"dim": 48}}, prefix="model.") == {"model.dit.dim": 48}

# ------------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_and_additions_only_and_merges_exactly():
    pytest.importorskip("peft")
    dit = tiny_config(audio_dim=16, audio_feature_dim=8, audio_layers_in=1, audio_blocks=[0])
    model = randomise(AvatarDiT(dit), 0.1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("audio_attn" in n for n in trainable)
    assert not any(n.endswith("self_attn.q.base_layer.weight") for n in trainable)
    assert not any(n.startswith("blocks.0.ffn.0.base") for n in trainable)
    # Give the adapters non-zero weights (lora_B starts at zero), then compare merged vs adapted outputs.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, t, ctx = torch.randn(1, 4, 2, 4, 4), torch.full((1,), 500.0), torch.randn(1, 8, 32)
    audio = torch.randn(1, 2, 1, 8)
    adapted = model(x, t, ctx, audio)
    merged = merged_copy(model)
    assert set(merged.state_dict()) == set(base)           # plain Wan names again
    torch.testing.assert_close(merged(x, t, ctx, audio), adapted, rtol=1e-4, atol=1e-5)
    assert not torch.equal(merged.state_dict()["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(AvatarDiT(dit), LoraSettings(rank=2, targets=["nothing"]))


# ----------------------------------------------------------------------------------------- configs, scale
def test_experiments_compose_and_the_14b_recipe_is_bf16_fsdp_lora():
    teacher = compose_train("experiment=toy_teacher")
    df = compose_train("experiment=toy_df")
    assert teacher.stage == "teacher" and df.stage == "diffusion_forcing"
    assert df.init_from == "outputs/train/toy_teacher/model"
    assert df.data.latent_frames % df.model.dit.frames_per_block == 0
    # The sink model that learns lip sync: clips of its streaming window plus the current block, RAPR's cap beyond
    # the window, from scratch, the mouth weighted.
    mouth = compose_train("experiment=toy_df_sink_mouth")
    blocks = mouth.data.latent_frames // mouth.model.dit.frames_per_block
    assert mouth.model.dit.reference == "sink" and blocks == mouth.model.window_blocks + 1 == 5
    assert mouth.model.rope.max_distance > mouth.model.window_blocks * mouth.model.dit.frames_per_block
    assert mouth.init_from is None and mouth.loss.mouth_weight > 0
    big = compose_train("experiment=liveavatar_14b_df", "init_from=/ckpt", "data.path=/shards")
    assert big.model.name == "liveavatar-14b" and big.model.dit.family == "s2v"  # from the S2V base, as the paper
    assert big.trainer.precision == "bf16-true"
    assert big.trainer.strategy.name == "fsdp" and big.memory.gradient_checkpointing
    assert big.lora.rank > 0 and big.data.kind == "shards"
    for zero in ("deepspeed_zero2", "deepspeed_zero3"):
        cfg = compose_train("experiment=liveavatar_14b_df", f"trainer={zero}")
        assert cfg.trainer.strategy.name == "deepspeed" and cfg.trainer.strategy.stage == int(zero[-1])


def test_strategies_are_built_by_name():
    from liveavatar.training.sharding import FSDP2Strategy

    assert build_strategy("auto") == "auto"
    fsdp = build_strategy({"name": "fsdp"})
    assert isinstance(fsdp, FSDP2Strategy) and not fsdp.distributed_checkpoint
    assert build_strategy({"name": "fsdp", "state_dict_type": "sharded"}).distributed_checkpoint
    with pytest.raises(ValueError, match="expected full or sharded"):
        build_strategy({"name": "fsdp", "state_dict_type": "local"})
    with pytest.raises(ValueError, match="unknown options"):
        build_strategy({"name": "fsdp", "shardnig": "x"})
    with pytest.raises(ValueError, match="expected one of"):
        build_strategy({"name": "horovod"})
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install"):
            build_strategy({"name": "deepspeed", "stage": 3})


def test_the_denoise_probe_reads_a_run_folder_and_reports_each_noise_level(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_train("experiment=toy_df", "init_from=null", *FAST, "trainer.max_steps=2", f"run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    probe = [sys.executable, str(ROOT / "scripts" / "denoise_probe.py")]
    done = subprocess.run([*probe, str(run_dir), "--timesteps", "500", "20", "--clips", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    levels = json.loads(done.stdout.strip().splitlines()[-1])["levels"]
    assert [r["t"] for r in levels] == [500, 20]
    # Returning the noisy input is off by sigma * |noise - x0|: 25x smaller at t = 20 than at t = 500.
    assert levels[0]["noisy_input_error"] / levels[1]["noisy_input_error"] == pytest.approx(25, rel=0.15)
    # At t = 20 the estimate is the clip itself but for 2 % noise: its mouth still follows the audio (the
    # renderer's own clips read 0.98 over these frames); at t = 500 an untrained model's does not.
    assert levels[1]["x0_lip_sync"] > 0.9 and levels[0]["x0_lip_sync"] < levels[1]["x0_lip_sync"]
    bad = subprocess.run([*probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.splitlines()) == 1


def test_the_audio_route_learns_at_its_own_rate():
    """``optim.audio_lr_scale``: Adam's first step moves each weight by about its group's learning rate (the update
    is lr * g / |g|), so the audio route's largest change is the scale times the rest's."""
    from liveavatar.training.launch import build_module

    cfg = compose_train("experiment=toy_df", "init_from=null", "data.latent_frames=3", "optim.lr=1e-3",
                        "optim.warmup_steps=0", "optim.audio_lr_scale=10")
    module = build_module(cfg)
    module.configure_model()
    randomise(module.model, std=0.05)   # a fresh model's zero head would give every other weight a zero gradient
    optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-3)   # as configure_optimizers builds it
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    names = {id(p): n for n, p in module.model.named_parameters()}
    audio = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert audio and all(n.startswith(("audio_proj.", "audio_modulation.")) or ".audio_attn." in n for n in audio)
    assert len(audio) + len(optimizer.param_groups[0]["params"]) == len(names)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = collate([ToyDataset(2, 3, module.dit_config)[i] for i in range(2)])
    loss, _ = module.loss_fn(module.model, batch)
    loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in module.model.named_parameters()}
    assert max(moved[n] for n in audio) == pytest.approx(1e-2, rel=0.05)
    assert max(v for n, v in moved.items() if n not in audio) == pytest.approx(1e-3, rel=0.05)


def test_toy_samples_carry_mouth_regions_on_the_latent_grid_when_asked():
    cfg = compose_train("experiment=toy_df", "init_from=null")
    from liveavatar.training.launch import build_module

    dit = build_module(cfg).dit_config
    sample = ToyDataset(4, 6, dit, mouth_regions=True)[1]
    region = sample["mouth_region"]
    assert region.shape == (6, *sample["latents"].shape[-2:]) and 0 < region.mean() < 0.1 and region.max() <= 1.0
    # Each latent pixel codes a 2x2 patch: it is as covered as the most covered pixel of its patch.
    scene = make_clip(ToyDataset(4, 6, dit).clip_seed(1), 6)
    pixels = mouth_region(scene.identity, scene.head)
    torch.testing.assert_close(region, pixels.unflatten(1, (16, 2)).unflatten(3, (16, 2)).amax((2, 4)))
    assert "mouth_region" not in ToyDataset(4, 6, dit)[1]
