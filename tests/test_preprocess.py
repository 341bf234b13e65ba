"""Real-video preprocessing (liveavatar.data.preprocess) and the shards it writes (liveavatar.data.shards):
samples equal to independent encodes of the decoded videos, skipped clips with their reasons, re-runs, the CLI's
exit codes, and ShardDataset's shapes and model checks."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from liveavatar import media
from liveavatar.data.preprocess import run
from liveavatar.data.shards import ShardDataset
from liveavatar.inference import UserError
from liveavatar.models.audio import EnergyMelFeatures
from liveavatar.models.text import RandomTextEncoder
from liveavatar.models.vae import PatchVAE, WanVAE

ROOT = Path(__file__).resolve().parents[1]
TINY = OmegaConf.load(ROOT / "conf/model/tiny.yaml")
FPS, SIZE, WINDOW = 25, (32, 32), 6  # the tiny preset; conf/preprocess.yaml's 6 latent frames = 6 video frames
CAPTION = "a woman talking to the camera"
DEFAULT_PROMPT = "a person talking to the camera"


# ------------------------------------------------------------------------------------------------- inputs


def moving_frames(t: int, h: int, w: int, phase: float = 0.0) -> torch.Tensor:
    """Smooth coloured gradients that move over time: ``[T, 3, H, W]`` in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([torch.stack([0.8 * x * np.cos(k / 5 + phase), 0.7 * y, 0.6 * torch.sin(2 * x * y + k / 3)])
                        for k in range(t)])


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A syllable-like tone with noise, 16 kHz."""
    rng = np.random.default_rng(seed)
    n = np.arange(int(seconds * 16000))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * n / 16000)
    return (0.4 * envelope * np.sin(2 * np.pi * 180 * n / 16000) + 0.05 * rng.standard_normal(n.size)).astype(np.float32)


def write_video(path: Path, frames: int, fps: float, h: int, w: int, audio_seconds: float | None, phase=0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = speech(audio_seconds, seed=int(phase * 10)) if audio_seconds else None
    with media.VideoWriter(path, fps=fps, audio=audio, sample_rate=16000) as writer:
        writer.write(moving_frames(frames, h, w, phase))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two good clips (25 fps 32x32 with a caption, 30 fps 48x40 in Matroska) and four bad ones."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a" / "talk25.mp4", 25, 25, 32, 32, 1.2)
    (root / "a" / "talk25.txt").write_text(CAPTION + "\n")
    write_video(root / "b" / "talk30.mkv", 36, 30, 40, 48, 1.5, phase=1.0)
    write_video(root / "silent.mp4", 25, 25, 32, 32, None)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    write_video(root / "short.mp4", 4, 25, 32, 32, 1.0)
    write_video(root / "badcap.mp4", 25, 25, 32, 32, 1.0)
    (root / "badcap.txt").write_bytes(b"caf\xe9 \xff\xfe")  # not UTF-8
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def one_video(videos, tmp_path_factory) -> Path:
    """A folder holding only the 25 fps clip and its caption."""
    root = tmp_path_factory.mktemp("one")
    for name in ("talk25.mp4", "talk25.txt"):
        shutil.copy2(videos / "a" / name, root / name)
    return root


def config(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("preprocess", list(overrides))


@pytest.fixture(scope="module")
def tiny_run(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = run(config(f"videos={videos}", f"out={out}", "data.shard_size=4"))
    return result, out


# ------------------------------------------------------------------------------------------- references


def expected_frames(path: Path, fps: float = FPS, size=SIZE) -> torch.Tensor:
    """Independent reference: the whole clip via media.read_video, frame ``round(j * src_fps / fps)`` for output
    frame ``j`` (no ties at the rates used here), each resized like an image -> ``[T, 3, H, W]``."""
    frames, src_fps = media.read_video(path)
    n = int(len(frames) * fps // src_fps)
    picks = [min(len(frames) - 1, round(j * src_fps / fps)) for j in range(n)]
    return torch.stack([media.resize_crop(frames[i], size) for i in picks])


def encode(vae, frames: torch.Tensor) -> torch.Tensor:
    """``[T, 3, H, W]`` -> latents ``[C, F, h, w]``."""
    return vae.encode(frames.permute(1, 0, 2, 3)[None])[0].float()


def text_reference(prompt: str) -> tuple[torch.Tensor, int]:
    emb, lengths = RandomTextEncoder(int(TINY.dit.text_dim), int(TINY.dit.text_len))([prompt])
    padded = torch.zeros(int(TINY.dit.text_len), int(TINY.dit.text_dim))
    padded[: emb.shape[1]] = emb[0]
    return padded, int(lengths[0])


# ------------------------------------------------------------------------------------------------ samples


def test_samples_equal_independent_encodes(tiny_run, videos):
    result, out = tiny_run
    ds = ShardDataset(out)
    starts = {"a/talk25.mp4": [0, 6, 12, 18], "b/talk30.mkv": [0, 6, 12, 18, 24]}  # 25 and 30 frames at 25 fps
    assert [(s["source"], s["start"]) for s in ds.manifest["samples"]] == [(k, v) for k in starts for v in starts[k]]
    assert (result.videos, result.samples, result.shards) == (6, 9, 3) and len(ds) == 9
    assert [s["samples"] for s in ds.manifest["shards"]] == [4, 4, 1]

    vae, mel = PatchVAE(space_factor=2), EnergyMelFeatures(n_mels=31)
    cache = {}
    for i in range(len(ds)):
        s = ds[i]
        path = videos / s["source"]
        if path not in cache:
            wav = media.read_audio(path)
            cache[path] = expected_frames(path), mel(wav, int(len(wav) * FPS // 16000))[0]
        frames, features = cache[path]
        start = s["start"]
        assert torch.equal(s["latents"], encode(vae, frames[start : start + WINDOW]))
        assert torch.equal(s["reference"], encode(vae, frames[:1]))  # data.reference_frame=first
        assert torch.equal(s["audio"], features[start : start + WINDOW])
        text, length = text_reference(CAPTION if "talk25" in s["source"] else DEFAULT_PROMPT)
        assert torch.equal(s["text"], text) and int(s["text_len"]) == length
    assert len(expected_frames(videos / "b/talk30.mkv")) == 30  # 36 frames at 30 fps -> 30 at 25 fps


def test_bad_clips_are_skipped_with_reasons(tiny_run):
    result, out = tiny_run
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reasons) == ["badcap.mp4", "corrupt.mp4", "short.mp4", "silent.mp4"]
    assert reasons["silent.mp4"] == "no audio track"
    assert "too short" in reasons["short.mp4"] and "needs 6" in reasons["short.mp4"]
    assert "cannot open" in reasons["corrupt.mp4"]
    assert reasons["badcap.mp4"] == "caption badcap.txt is not UTF-8 text"
    assert all("\n" not in r for r in reasons.values()) and result.skipped == manifest["skipped"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_manifest_records_shapes_and_preset(tiny_run):
    _, out = tiny_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "liveavatar-shards" and manifest["version"] == 1
    assert manifest["model"]["name"] == "tiny"
    assert manifest["shapes"] == {
        "latent_channels": 12, "latent_frames": 6, "latent_height": 16, "latent_width": 16, "video_frames": 6,
        "height": 32, "width": 32, "audio_layers": 1, "audio_feature_dim": 32, "text_len": 16, "text_dim": 32,
        "fps": 25.0, "sample_rate": 16000, "vae": "patch", "vae_time_factor": 1, "vae_space_factor": 2,
        "sink_motion_latents": 0,
    }


def test_window_audio_and_other_reference_frames(one_video, tmp_path):
    path = one_video / "talk25.mp4"
    frames, wav = expected_frames(path), media.read_audio(path)
    vae, mel = PatchVAE(space_factor=2), EnergyMelFeatures(n_mels=31)
    run(config(f"videos={one_video}", f"out={tmp_path}/w", "data.audio_context=window", "data.reference_frame=last"))
    ds = ShardDataset(tmp_path / "w")
    for i in range(len(ds)):
        s = ds[i]
        a0 = s["start"] * 16000 // FPS
        assert torch.equal(s["audio"], mel(wav[a0 : a0 + WINDOW * 16000 // FPS], WINDOW)[0])
        assert torch.equal(s["reference"], encode(vae, frames[-1:]))
    run(config(f"videos={one_video}", f"out={tmp_path}/k", "data.reference_frame=7"))
    assert torch.equal(ShardDataset(tmp_path / "k")[0]["reference"], encode(vae, frames[7:8]))
    with pytest.raises(UserError, match="no usable video.*fewer than data.reference_frame=40"):
        run(config(f"videos={one_video}", f"out={tmp_path}/late", "data.reference_frame=40"))
    assert not (tmp_path / "late" / "manifest.json").exists()


def _tiny_wan_vae(path: Path) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)  # as tests/test_vae.py: 4x time, 4x space, 4 latent channels
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
                     scale_factor_spatial=4).save_pretrained(path)
    return path


def test_wan_vae_windows_of_1_plus_4_frames(one_video, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only add overhead on a loaded 2-core machine
    try:
        vae_path = _tiny_wan_vae(tmp_path / "vae")
        result = run(config(
            f"videos={one_video}", f"out={tmp_path}/out", "model.vae.kind=wan", f"model.vae.path={vae_path}",
            "model.dit.in_dim=4", "model.dit.out_dim=4", "model.dit.video_frames_per_latent=4",
            "data.clip_latent_frames=3",
        ))
        ds = ShardDataset(tmp_path / "out")
        shapes = ds.shapes
        assert (shapes["vae"], shapes["latent_frames"], shapes["video_frames"]) == ("wan", 3, 9)  # 1 + 4 * 2
        assert result.samples == 2 and [s["start"] for s in ds.manifest["samples"]] == [0, 9]  # 25 frames
        vae, frames = WanVAE.from_pretrained(vae_path), expected_frames(one_video / "talk25.mp4")
        for i in range(2):
            s = ds[i]
            assert s["latents"].shape == (4, 3, 8, 8) and s["audio"].shape == (9, 1, 32)
            assert torch.equal(s["latents"], encode(vae, frames[s["start"] : s["start"] + 9]))
            assert torch.equal(s["reference"], encode(vae, frames[:1]))
        ds.check(OmegaConf.merge(TINY.dit, {"in_dim": 4, "out_dim": 4, "video_frames_per_latent": 4}))
        with pytest.raises(ValueError, match="video_frames_per_latent=1"):
            ds.check(OmegaConf.merge(TINY.dit, {"in_dim": 4, "out_dim": 4}))
        # The preset must agree with its VAE before any work is done.
        with pytest.raises(UserError, match="video_frames_per_latent=1"):
            run(config(f"videos={one_video}", f"out={tmp_path}/bad", "model.vae.kind=wan", f"model.vae.path={vae_path}",
                       "model.dit.in_dim=4", "model.dit.out_dim=4", "data.clip_latent_frames=3"))
    finally:
        torch.set_num_threads(threads)


def test_sink_motion_latents_are_the_still_reference_stored_once_per_video(one_video, tmp_path):
    # model.sink_motion: each sample carries its reference frame held still for motion_video_frames video frames,
    # VAE-encoded (the sink's FramePack motion latents); windows of one video share one stored copy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae_path = _tiny_wan_vae(tmp_path / "vae")
        run(config(f"videos={one_video}", f"out={tmp_path}/out", "model.vae.kind=wan", f"model.vae.path={vae_path}",
                   "model.dit.in_dim=4", "model.dit.out_dim=4", "model.dit.video_frames_per_latent=4",
                   "data.clip_latent_frames=3", "model.sink_motion=true", "+model.dit.motion_video_frames=9"))
        ds = ShardDataset(tmp_path / "out")
        assert ds.shapes["sink_motion_latents"] == 3  # 9 video frames: 1 + 4 + 4
        vae, frames = WanVAE.from_pretrained(vae_path), expected_frames(one_video / "talk25.mp4")
        still = encode(vae, frames[:1].expand(9, -1, -1, -1))
        assert len(ds) == 2 and all(torch.equal(ds[i]["sink_motion"], still) for i in range(2))
        assert not torch.equal(still[:, 1], still[:, 0])  # a still clip's later latents are not the image latent
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out" / ds.manifest["shards"][0]["file"]), framework="pt") as f:
            assert f.get_slice("sink_motion").get_shape()[0] == 1
        # Without model.sink_motion the samples carry none.
        run(config(f"videos={one_video}", f"out={tmp_path}/plain", "model.vae.kind=wan", f"model.vae.path={vae_path}",
                   "model.dit.in_dim=4", "model.dit.out_dim=4", "model.dit.video_frames_per_latent=4",
                   "data.clip_latent_frames=3"))
        assert "sink_motion" not in ShardDataset(tmp_path / "plain")[0]
        # Training a model.sink_motion model on them is refused in one line.
        from liveavatar.models import DiTConfig
        from liveavatar.training.datamodule import AvatarDataModule, DataSettings

        dit = DiTConfig.from_dict(OmegaConf.to_container(OmegaConf.merge(
            TINY.dit, {"in_dim": 4, "out_dim": 4, "video_frames_per_latent": 4, "motion_video_frames": 9})))
        AvatarDataModule(DataSettings(kind="shards", path=str(tmp_path / "out")), dit, {"sink_motion": True}).build()
        with pytest.raises(ValueError, match=r"^model.sink_motion=true: the shards in .* hold no sink motion[^\n]*$"):
            AvatarDataModule(DataSettings(kind="shards", path=str(tmp_path / "plain")), dit, {"sink_motion": True}).build()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- re-runs


def test_rerun_skips_refuses_or_overwrites(one_video, tmp_path):
    out = tmp_path / "out"
    args = [f"videos={one_video}", f"out={out}"]
    first = run(config(*args))
    stamp = (out / "shard-00000.safetensors").stat().st_mtime_ns
    again = run(config(*args))
    assert again.up_to_date and not first.up_to_date and again.samples == first.samples == 4
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="made with other settings; pass overwrite=true") as err:
        run(config(*args, "data.shard_size=3"))
    assert "\n" not in str(err.value)
    redone = run(config(*args, "data.shard_size=3", "overwrite=true"))
    assert (redone.shards, redone.up_to_date) == (2, False) and len(ShardDataset(out)) == 4
    caption = one_video / "talk25.txt"
    os.utime(caption, ns=(caption.stat().st_atime_ns, caption.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="made from other inputs"):
        run(config(*args, "data.shard_size=3"))


def test_output_folder_states(one_video, videos, tmp_path):
    # Leftovers of an interrupted run (shards, a temporary file, no manifest) are ours: cleared, run again.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "shard-00003.safetensors").write_bytes(b"old")
    (crashed / ".shard-00004.safetensors.partial").write_bytes(b"half")
    run(config(f"videos={one_video}", f"out={crashed}"))
    assert sorted(p.name for p in crashed.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    # Somebody else's folder: refused, or written beside their files with overwrite=true.
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty and holds no preprocessing manifest"):
        run(config(f"videos={one_video}", f"out={other}"))
    run(config(f"videos={one_video}", f"out={other}", "overwrite=true"))
    assert (other / "mine.txt").read_text() == "keep me" and len(ShardDataset(other)) == 4
    # Bad input.
    with pytest.raises(UserError, match="no such folder"):
        run(config(f"videos={tmp_path}/missing", f"out={tmp_path}/x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no video files"):
        run(config(f"videos={empty}", f"out={tmp_path}/x"))
    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    shutil.copy(videos / "corrupt.mp4", bad_only)
    with pytest.raises(UserError, match="no usable video.*corrupt.mp4"):
        run(config(f"videos={bad_only}", f"out={tmp_path}/y"))
    assert not (tmp_path / "y" / "manifest.json").exists()
    with pytest.raises(UserError, match="clip_latent_frames=4: not a multiple of model.dit.frames_per_block 3"):
        run(config(f"videos={one_video}", f"out={tmp_path}/z", "data.clip_latent_frames=4"))
    with pytest.raises(UserError, match="data.reference_frame=middle"):
        run(config(f"videos={one_video}", f"out={tmp_path}/z", "data.reference_frame=middle"))


# ----------------------------------------------------------------------------------------------------- CLI


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liveavatar.data.preprocess", *args, f"hydra.run.dir={tmp_path}/hydra"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and text in proc.stderr


def test_cli(one_video, tmp_path):
    out = tmp_path / "out"
    ok = cli(tmp_path, f"videos={one_video}", f"out={out}")
    assert ok.returncode == 0, ok.stderr
    assert f"wrote 4 samples in 1 shard to {out} from 1 video (0 skipped)" in ok.stdout
    assert (out / "manifest.json").is_file()
    stamp = (out / "shard-00000.safetensors").stat().st_mtime_ns
    again = cli(tmp_path, f"videos={one_video}", f"out={out}")
    assert again.returncode == 0 and "is up to date" in again.stdout and "nothing to do" in again.stdout
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    assert_one_line_error(cli(tmp_path, f"videos={one_video}", f"out={one_video}"), "holds no preprocessing manifest")
    assert_one_line_error(cli(tmp_path, f"videos={tmp_path}/nowhere", f"out={tmp_path}/o"), "nowhere: no such folder")
    assert_one_line_error(cli(tmp_path, "model=giant", f"videos={one_video}"), "model=giant: unknown; choose one of ")


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_samples_and_loader(tiny_run):
    _, out = tiny_run
    ds = ShardDataset(out, dit_config=TINY.dit)
    s = ds[5]
    assert set(s) == {"latents", "reference", "audio", "text", "text_len", "source", "start"}
    assert s["latents"].shape == (12, 6, 16, 16) and s["reference"].shape == (12, 1, 16, 16)
    assert s["audio"].shape == (6, 1, 32) and s["text"].shape == (16, 32)
    assert all(s[k].dtype == torch.float32 for k in ("latents", "reference", "audio", "text"))
    assert s["text_len"].dtype == torch.int64 and s["text_len"].dim() == 0
    assert (s["source"], s["start"]) == ("b/talk30.mkv", 6)
    assert torch.equal(ds[-1]["latents"], ds[8]["latents"])
    with pytest.raises(IndexError):
        ds[9]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives: reopens the shards itself
    assert torch.equal(clone[5]["audio"], s["audio"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["latents"].shape == (4, 12, 6, 16, 16) and batch["source"][0] == "a/talk25.mp4"


@pytest.mark.parametrize("override,message", [
    ({"in_dim": 16}, "latent channels 12 != model in_dim 16"),
    ({"frames_per_block": 4}, "not a multiple of frames_per_block 4"),
    ({"audio_feature_dim": 64}, "audio_feature_dim 64"),
    ({"text_dim": 48}, "text_dim 32 != model text_dim 48"),
    ({"text_len": 8}, "text_len 16 > model text_len 8"),
])
def test_check_names_the_mismatch(tiny_run, override, message):
    _, out = tiny_run
    with pytest.raises(ValueError, match=message) as err:
        ShardDataset(out, dit_config=OmegaConf.merge(TINY.dit, override))
    assert "\n" not in str(err.value) and str(out) in str(err.value)


def test_missing_or_corrupt_manifest(tiny_run, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/manifest.json: not found"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/manifest.json: unreadable or corrupt"):
        ShardDataset(tmp_path)
    _, out = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "manifest.json", copy)
    shutil.copy(out / "shard-00000.safetensors", copy)
    with pytest.raises(ValueError, match="lists shard-00001.safetensors, which is missing"):
        ShardDataset(copy)


# ----------------------------------------------------------------------------------------------- readers


def test_decord_reader_writes_the_same_shards(tiny_run, videos, tmp_path):
    """reader=decord decodes the frames with decord: the same samples and skipped clips as PyAV's run."""
    pytest.importorskip("decord")
    result = run(config(f"videos={videos}", f"out={tmp_path}/d", "data.shard_size=4", "reader=decord"))
    pyav_result, pyav_out = tiny_run
    a, b = ShardDataset(pyav_out), ShardDataset(tmp_path / "d")
    assert len(a) == len(b) == result.samples == pyav_result.samples
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert (x["source"], x["start"]) == (y["source"], y["start"])
        for key in ("latents", "reference", "audio", "text"):
            assert torch.equal(x[key], y[key]), (i, key)
    assert result.skipped == pyav_result.skipped
    assert b.manifest["inputs"]["reader"] == "decord" and a.manifest["inputs"]["reader"] == "pyav"


def test_reader_errors_are_one_line(one_video, tmp_path):
    with pytest.raises(UserError, match="reader=opencv: expected one of pyav, decord"):
        run(config(f"videos={one_video}", f"out={tmp_path}/x", "reader=opencv"))
    # Without decord installed (a stand-in package that fails to import, first on the path): one line, status 2.
    fake = tmp_path / "no_decord" / "decord"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'decord'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "liveavatar.data.preprocess", f"videos={one_video}", f"out={tmp_path}/y",
                           "reader=decord", f"hydra.run.dir={tmp_path}/hydra"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert_one_line_error(proc, "pip install 'liveavatar[decord]'")
    assert not (tmp_path / "y").exists()
