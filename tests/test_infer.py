"""infer.py end to end on the tiny preset: the output file, the report, and one-line errors for bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from liveavatar import media
from liveavatar.inference import UserError, run
from liveavatar.models import AvatarDiT, DiTConfig

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("infer", [f"image={ROOT}/data/example/reference.png", f"audio={ROOT}/data/example/speech.wav",
                                 f"output.path={tmp_path}/out.mp4", "max_seconds=1", *overrides])


def test_writes_mp4_with_audio_and_lossless_frames(tmp_path):
    report = run(config(tmp_path, "output.frames=true"))
    info = media.probe(tmp_path / "out.mp4")
    assert report.frames == 25 and info["frames"] == 25 and info["has_audio"]
    assert (info["width"], info["height"]) == (32, 32)
    assert abs(info["fps"] - 25) < 1e-6
    frames = np.load(tmp_path / "out.frames.npy")
    assert frames.shape == (25, 3, 32, 32) and frames.dtype == np.uint8
    assert report.first_frame_s <= report.generation_s and report.rtf > 0
    assert not list(tmp_path.glob(".*partial*"))


def test_engines_agree_through_the_cli(tmp_path, tiny_checkpoint, capsys):
    trained = f"checkpoint={tiny_checkpoint}"
    run(config(tmp_path / "a", "output.frames=true", "engine=sequential", trained))
    run(config(tmp_path / "b", "output.frames=true", "engine=stream_batch", trained))
    a, b = np.load(tmp_path / "a" / "out.frames.npy"), np.load(tmp_path / "b" / "out.frames.npy")
    # Decoded to uint8 from latents equal to ~1e-6: at most a rounding flip of one level.
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert "checkpoint=null" not in capsys.readouterr().err
    # The model, not only the noise, made these frames: the untrained one (zero velocity) streams other frames.
    run(config(tmp_path / "c", "output.frames=true", "engine=sequential"))
    untrained = np.load(tmp_path / "c" / "out.frames.npy")
    assert np.abs(a.astype(int) - untrained.astype(int)).mean() > 5


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["image=/nonexistent/face.png"], "face.png"),
        (["audio=/nonexistent/talk.wav"], "talk.wav"),
        (["model.resolution=[30,30]"], "must be divisible by 4"),
        (["engine=stream_batch", "engine.history=clean"], "needs engine.history=timestep_forced"),
        (["engine.sink=bogus"], "engine.sink must be one of"),
        (["dtype=int8"], "dtype=int8"),
    ],
)
def test_bad_input_raises_one_line_user_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as err:
        run(config(tmp_path, *overrides))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.mp4").exists()


def test_corrupt_image_and_empty_audio(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(UserError, match="bad.png"):
        run(config(tmp_path, f"image={tmp_path}/bad.png"))
    media.write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(UserError, match="empty.wav"):
        run(config(tmp_path, f"audio={tmp_path}/empty.wav"))


def test_checkpoint_that_does_not_fit_the_preset(tmp_path):
    cfg = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_dim=12, out_dim=12, text_dim=32, text_len=16)
    AvatarDiT(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="does not fit the model") as err:
        run(config(tmp_path, f"checkpoint={tmp_path}/other"))
    assert "model=tiny" in str(err.value)


def test_checkpoint_roundtrip_through_the_cli(tmp_path):
    torch.manual_seed(0)
    model = AvatarDiT(DiTConfig.from_dict(dict(compose_tiny())))
    model.save_pretrained(tmp_path / "ckpt")
    report = run(config(tmp_path, f"checkpoint={tmp_path}/ckpt"))
    assert report.frames == 25


def compose_tiny():
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").dit)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_codes_and_messages(tmp_path):
    bad = cli("image=/nonexistent.png", f"output.path={tmp_path}/x.mp4")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in bad.stderr
    unknown = cli("model=giant")
    assert unknown.returncode == 2 and "model=giant: unknown; choose one of " in unknown.stderr and " tiny," in unknown.stderr
    ok = cli(f"output.path={tmp_path}/y.mp4", "max_seconds=0.5")
    assert ok.returncode == 0, ok.stderr
    # Hydra sends log records to stdout; the untrained-model notice is on stderr, on one line.
    notice = [line for line in ok.stderr.splitlines() if "checkpoint=null" in line]
    assert notice == ["warning: checkpoint=null: streaming an untrained model with random weights of the tiny "
                      "preset; its output is noise"]
    assert "time to first frame" in ok.stdout and "real-time factor" in ok.stdout
    assert (tmp_path / "y.mp4").is_file()


def test_streaming_audio_features_through_the_cli(tmp_path):
    """``audio_features.streaming=true`` feeds the audio block by block: same video length, and for the tiny
    preset's energy/mel features (exact when streamed, see test_audio) the same frames as the offline run."""
    streamed = cli(f"output.path={tmp_path}/s.mp4", "max_seconds=1", "output.frames=true",
                   "audio_features.streaming=true", "audio_features.lookback_s=0.5")
    assert streamed.returncode == 0, streamed.stderr
    offline = run(config(tmp_path, "output.frames=true"))
    assert media.probe(tmp_path / "s.mp4")["frames"] == offline.frames == 25
    a, b = np.load(tmp_path / "s.frames.npy"), np.load(tmp_path / "out.frames.npy")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1

    with pytest.raises(UserError, match="lookback_s"):
        run(config(tmp_path, "audio_features.streaming=true", "audio_features.lookback_s=-1"))
