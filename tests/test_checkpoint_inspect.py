"""``python -m liveavatar.checkpoints inspect``: a checkpoint's widths, family, LoRA keys and fit against a preset,
read from headers; one line and exit 2 for a path that is not a checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from liveavatar.checkpoints import inspect, table
from liveavatar.models import AvatarDiT

from conftest import tiny_preset

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "liveavatar.checkpoints", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_saved_model_is_described_and_fits_its_preset(tmp_path):
    AvatarDiT(tiny_preset()).save_pretrained(tmp_path / "tiny")
    done = run("inspect", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr
    out = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in done.stdout.splitlines()}
    cfg = tiny_preset()
    assert out["dim"] == str(cfg.dim) and out["num_layers"] == str(cfg.num_layers)
    assert out["num_heads"] == str(cfg.num_heads) and out["in_dim"] == str(cfg.in_dim)
    assert out["parameters"] == f"{AvatarDiT(cfg).num_parameters():,}"
    assert out["preset"] == "tiny: fits" and out["LoRA keys"] == "none" and out["key names"] == "wan"


def test_a_mismatching_preset_lists_what_differs(tmp_path):
    AvatarDiT(tiny_preset()).save_pretrained(tmp_path / "tiny")
    summary = inspect(tmp_path / "tiny", preset="wan2.1-1.3b")
    assert summary.problems["other shape"] and summary.problems["missing"]  # 4 layers against 30, other widths
    assert "wan2.1-1.3b: does NOT fit" in table(summary)


def test_lora_keys_and_the_s2v_family_are_recognised(tmp_path):
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8), "blocks.0.self_attn.q.lora_B.weight":
               torch.zeros(8, 4)}, tmp_path / "l.safetensors")
    assert inspect(tmp_path / "l.safetensors").lora_keys == 2
    save_file({"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "casual_audio_encoder.weights": torch.zeros(2)},
              tmp_path / "s2v.safetensors")
    assert inspect(tmp_path / "s2v.safetensors").family == "wan2.2-s2v"


def test_a_path_that_is_not_a_checkpoint_is_one_line(tmp_path):
    done = run("inspect", str(tmp_path / "absent"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'absent'} does not exist"]


def test_loading_a_checkpoint_of_another_family_is_one_line_naming_it(tmp_path):
    import pytest

    from liveavatar.models.checkpoint import CheckpointError

    state = AvatarDiT(tiny_preset()).state_dict()
    state["casual_audio_encoder.weights"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a Wan2.2-S2V model"):
        AvatarDiT.from_pretrained(tmp_path / "model.safetensors", config=tiny_preset())
