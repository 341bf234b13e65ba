"""Talking and listening (StreamAvatar): the speaking mask's semantics on the features, the mask from labels and
from two voices, the interact-audio attention (zero-initialised, so a talking-only checkpoint is unchanged), and
infer.py with a second voice."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from liveavatar import media
from liveavatar.inference import UserError, run
from liveavatar.models import AvatarDiT
from liveavatar.models.interaction import read_speaking_labels, speaking_from_voices, talk_listen_features

from conftest import randomise, tiny_config
from test_infer import config

FPS, SR = 25, 16000


def test_the_mask_multiplies_the_features_after_extraction():
    g = torch.Generator().manual_seed(0)
    talk, listen = torch.randn(2, 6, 3, 5, generator=g), torch.randn(2, 6, 3, 5, generator=g)
    speaking = torch.tensor([1, 1, 0, 0, 1, 0])
    out = talk_listen_features(talk, listen, speaking)
    assert out.shape == (2, 6, 6, 5)
    on, off = speaking.bool(), ~speaking.bool()
    torch.testing.assert_close(out[:, on, :3], talk[:, on])       # speaking: the own voice, untouched
    assert out[:, off, :3].abs().sum() == 0 and out[:, on, 3:].abs().sum() == 0
    torch.testing.assert_close(out[:, off, 3:], listen[:, off])   # listening: the other voice
    with pytest.raises(ValueError, match="mask of 5 frames"):
        talk_listen_features(talk, listen, speaking[:5])


def voice(segments: list[tuple[float, float]], seconds: float, freq: float, level: float = 0.3) -> np.ndarray:
    """A tone with a syllable envelope during ``segments`` (seconds), silence (faint noise) elsewhere."""
    n = np.arange(int(seconds * SR))
    wav = 1e-4 * np.random.default_rng(int(freq)).standard_normal(n.size)
    for a, b in segments:
        span = (n >= a * SR) & (n < b * SR)
        wav[span] += level * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * n[span] / SR)) * np.sin(2 * np.pi * freq * n[span] / SR)
    return wav.astype(np.float32)


def test_speaking_from_two_voices_follows_the_turns():
    # The avatar speaks 0-1 s and 2-3 s (with a 0.1 s pause at 2.5 s), the other person 1-2 s; at 3-3.4 s both talk,
    # the other louder.
    own = voice([(0, 1), (2, 2.5), (2.6, 3.4)], 4.0, 180)
    other = voice([(1, 2)], 4.0, 240) + voice([(3, 3.4)], 4.0, 300, level=0.6)
    mask = speaking_from_voices(own, other, 100, FPS, SR)
    expected = np.zeros(100, dtype=bool)
    expected[0:25] = expected[50:75] = True
    interior = np.ones(100, dtype=bool)
    interior[[24, 25, 49, 50, 74, 75, 84, 85]] = False  # frames straddling a turn change
    np.testing.assert_array_equal(mask[interior], expected[interior])
    assert mask[62:65].all()   # the short pause inside the turn is bridged
    assert not mask[76:85].any()  # overlapping, the louder voice holds the turn


def test_labels_from_files(tmp_path):
    np.save(tmp_path / "m.npy", np.array([1, 0, 1, 1, 0]))
    (tmp_path / "m.txt").write_text("1\n0\n1\n1\n0\n")
    (tmp_path / "m.json").write_text(json.dumps([[0.0, 0.04], [0.08, 0.16]]))
    expected = np.array([1, 0, 1, 1], dtype=bool)
    for name in ("m.npy", "m.txt", "m.json"):
        np.testing.assert_array_equal(read_speaking_labels(tmp_path / name, 4, FPS), expected)
    (tmp_path / "bad.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="0 \\(listening\\) or 1"):
        read_speaking_labels(tmp_path / "bad.txt", 2, FPS)
    with pytest.raises(ValueError, match="5 labels for 9 video frames"):
        read_speaking_labels(tmp_path / "m.npy", 9, FPS)
    with pytest.raises(ValueError, match="no such file"):
        read_speaking_labels(tmp_path / "none.npy", 2, FPS)


def listening_config(**kw):
    return tiny_config(in_dim=4, out_dim=4, reference="concat", audio_dim=16, audio_feature_dim=8, audio_layers_in=2,
                       audio_blocks=[0, 1], video_frames_per_latent=1, audio_modulation=True, **kw)


def test_interact_attention_starts_silent_and_then_hears_the_listening_stream(tmp_path):
    torch.manual_seed(0)
    talker = randomise(AvatarDiT(listening_config()), std=0.1).eval()
    talker.save_pretrained(tmp_path / "talker")
    listener = AvatarDiT.from_pretrained(tmp_path / "talker", config=listening_config(listening=True)).eval()
    assert sorted(m for m in listener.initialised_modules if "interact" in m) == [
        "blocks.0.interact_audio_attn", "blocks.1.interact_audio_attn", "interact_audio_proj"]
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 3, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 8, 32, generator=g)
    ref = torch.randn(1, 4, 1, 4, 4, generator=g)
    own, other = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)
    with torch.no_grad():
        before = talker(x, t, ctx, own, reference=ref)
        speaking = talk_listen_features(own, other, torch.ones(3))
        torch.testing.assert_close(listener(x, t, ctx, speaking, reference=ref), before, rtol=0, atol=0)
        randomise(listener, std=0.1, seed=3)
        listening = talk_listen_features(own, other, torch.zeros(3))
        base = listener(x, t, ctx, listening, reference=ref)
        # Listening, the own voice is masked away: it does not matter; the other voice does. (A constant added to
        # the features would vanish in the projection's LayerNorm: new features are drawn instead.)
        new = torch.randn(1, 3, 2, 8, generator=g)
        moved_own = listener(x, t, ctx, talk_listen_features(new, other, torch.zeros(3)), reference=ref)
        moved_other = listener(x, t, ctx, talk_listen_features(own, new, torch.zeros(3)), reference=ref)
    torch.testing.assert_close(moved_own, base, rtol=0, atol=0)
    assert (moved_other - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="two audio streams"):
        listener(x, t, ctx, own, reference=ref)


@pytest.fixture(scope="module")
def listening_checkpoint(tmp_path_factory) -> Path:
    from liveavatar.models.presets import preset_config
    from liveavatar.models import DiTConfig

    cfg = DiTConfig.from_dict({**preset_config("tiny")["dit"], "listening": True})
    path = tmp_path_factory.mktemp("listener") / "dit"
    torch.manual_seed(0)
    randomise(AvatarDiT(cfg), std=0.05, seed=5).save_pretrained(path)
    return path


def test_infer_with_a_second_voice_and_labels(tmp_path, listening_checkpoint):
    other = tmp_path / "other.wav"
    media.write_wav(other, voice([(0.2, 0.8)], 1.0, 240), SR)
    base = ["model.dit.listening=true", f"checkpoint={listening_checkpoint}", "output.frames=true"]

    def frames(*extra):
        out = tmp_path / f"v{len(list(tmp_path.glob('v*.mp4')))}.mp4"
        run(config(tmp_path, *base, f"output.path={out}", *extra))
        return np.load(out.with_suffix(".frames.npy"))

    np.save(tmp_path / "listening.npy", np.zeros(25))
    np.save(tmp_path / "speaking.npy", np.ones(25))
    talking = frames(f"audio_mask={tmp_path / 'speaking.npy'}")
    assert talking.shape[0] == 25
    np.testing.assert_array_equal(frames(), talking)  # a single recording without labels: all speaking
    listening = frames(f"audio_mask={tmp_path / 'listening.npy'}", f"listen_audio={other}")
    assert np.abs(listening.astype(int) - talking.astype(int)).mean() > 0.05
    detected = frames(f"listen_audio={other}")  # the mask from the two voices' energies
    assert detected.shape == talking.shape

    with pytest.raises(UserError, match="listening model"):
        run(config(tmp_path, f"listen_audio={other}"))
    with pytest.raises(UserError, match="labels for 25 video frames"):
        np.save(tmp_path / "short.npy", np.ones(3))
        run(config(tmp_path, *base, f"audio_mask={tmp_path / 'short.npy'}"))


@pytest.mark.distributed
def test_tpp_takes_both_voices_and_equals_sequential(tmp_path, listening_checkpoint):
    """TPP (2 DiT ranks + the decoding rank) with the second voice and labels: rank 0 builds each block's talk and
    listen features; the video equals the sequential engine's, frame for frame (one thread each, as TPP ranks run)."""
    from test_tpp import infer

    other = tmp_path / "other.wav"
    media.write_wav(other, voice([(0.2, 0.8)], 1.0, 240), SR)
    mask = tmp_path / "mask.npy"
    np.save(mask, (np.arange(25) >= 12).astype(np.float32))   # listening for the first half, then speaking
    common = ["model.dit.listening=true", f"checkpoint={listening_checkpoint}", "output.frames=true",
              "denoise.steps=[1000,500]", f"listen_audio={other}", f"audio_mask={mask}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(config(tmp_path, *common, f"output.path={tmp_path}/seq.mp4"))
    finally:
        torch.set_num_threads(threads)
    root = Path(__file__).resolve().parents[1]
    r = infer(f"image={root}/data/example/reference.png", f"audio={root}/data/example/speech.wav", "max_seconds=1",
              "engine=tpp", "engine.timeout_s=60", f"output.path={tmp_path}/tpp.mp4", *common, nproc=3, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    sequential = np.load(tmp_path / "seq.frames.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "tpp.frames.npy"), sequential)
    # The labels matter in this stream: all speaking gives another video.
    np.save(tmp_path / "speaking.npy", np.ones(25, dtype=np.float32))
    talking = [o for o in common if not o.startswith("audio_mask")] + [f"audio_mask={tmp_path / 'speaking.npy'}"]
    run(config(tmp_path, *talking, f"output.path={tmp_path}/talk.mp4"))
    assert np.abs(np.load(tmp_path / "talk.frames.npy").astype(int) - sequential.astype(int)).mean() > 0.05


# --------------------------------------------------------------------------------------------- the toy world
def test_toy_conversations_take_turns_listen_with_a_closed_mouth_and_nod():
    from liveavatar.data import toy
    from liveavatar.metrics.toy import interaction_scores

    clip = toy.make_clip(7, 150, conversation=True)
    shorter = toy.make_clip(7, 90, conversation=True)
    torch.testing.assert_close(shorter.video, clip.video[:, :90], rtol=0, atol=0)  # a prefix, as monologues are
    speaking = clip.speaking
    assert 0.1 < speaking.mean() < 0.9
    hop = SR // FPS
    own_turn = np.repeat(speaking, hop)
    assert np.abs(clip.wav[~own_turn]).max() == 0 and np.abs(clip.listen_wav[own_turn]).max() == 0
    assert (clip.mouth[~speaking] == 0).all()
    monologue = toy.make_clip(7, 150)
    nod = clip.head[:, 0] - monologue.head[:, 0]
    assert np.abs(nod[speaking]).max() == 0 and nod[~speaking].max() > 0.01

    scores = interaction_scores(clip.video, clip.reference, clip.wav, clip.listen_wav, speaking)
    still = interaction_scores(monologue.video, clip.reference, clip.wav, clip.listen_wav, speaking)
    assert scores.nod_sync > 0.5 > still.nod_sync           # the listener's head follows the other voice
    assert scores.lip_sync_speaking > 0.9 and scores.mouth_listening < 0.02


def test_toy_training_samples_of_a_listening_model_are_conversations():
    from liveavatar.training.datamodule import ToyDataset

    dit = tiny_config(in_dim=12, out_dim=12, text_dim=32, text_len=16, audio_dim=16, audio_feature_dim=32,
                      audio_layers_in=1, audio_blocks=[0], listening=True)
    from liveavatar.data.toy import make_clip

    data = ToyDataset(10, 100, dit)
    index = next(i for i in range(10) if 0 < make_clip(data.clip_seed(i), 100, conversation=True).speaking.mean() < 1)
    sample, clip = data[index], make_clip(data.clip_seed(index), 100, conversation=True)
    assert sample["audio"].shape == (100, 2, 32)
    speaking = torch.from_numpy(clip.speaking)
    assert sample["audio"][~speaking, 0].abs().sum() == 0 and sample["audio"][speaking, 1].abs().sum() == 0
    assert sample["audio"][speaking, 0].abs().sum() > 0 and sample["audio"][~speaking, 1].abs().sum() > 0


def test_genbench_interactive_suite_scores_talking_and_listening(tmp_path, listening_checkpoint):
    from test_genbench import genbench_cfg
    from liveavatar.evaluation.genbench import run_genbench

    results = run_genbench(genbench_cfg(f"checkpoint={listening_checkpoint}", "bench=toy_interactive",
                                        "toy_interactive.clips=1", "toy_interactive.seconds=2.0",
                                        "model.dit.listening=true", f"out={tmp_path / 'g'}"))
    whole = results["whole"]
    for key in ("listening_motion", "speaking_motion", "nod_sync", "lip_sync_speaking", "mouth_listening"):
        assert key in whole and np.isfinite(whole[key])
    record = json.loads(next((tmp_path / "g" / "cases").glob("*/scores.json")).read_text())
    assert record["case"]["conversation"] and "nod_sync" in record["whole"]
