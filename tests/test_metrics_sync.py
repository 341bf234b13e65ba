"""Sync-C / Sync-D: the SyncNet module loads a state dict with the released parameter names strictly, the offset
search recovers a known shift (with its sign) from embeddings built to match at that shift, the MFCCs keep
python_speech_features' framing and put a tone's energy in its mel band, and the whole scorer runs on a toy clip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar.metrics.mfcc import mel_filterbank, mfcc
from liveavatar.metrics.syncnet import SyncNet, lip_frames, offset_search, sync_scores
from liveavatar.metrics.weights import MissingWeights


def test_the_state_dict_loads_strictly_and_bad_files_are_one_line(tmp_path):
    torch.manual_seed(0)
    model = SyncNet()
    names = set(model.state_dict())
    assert {"netcnnaud.0.weight", "netcnnaud.18.weight", "netcnnlip.18.weight", "netfcaud.3.weight",
            "netfclip.1.running_mean"} <= names
    torch.save(model.state_dict(), tmp_path / "syncnet_v2.model")
    loaded = SyncNet.from_file(tmp_path / "syncnet_v2.model")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(MissingWeights, match="Sync-C/Sync-D: metrics.syncnet=.*not found .*syncnet_v2.model"):
        SyncNet.from_file(tmp_path / "absent.model")
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.model")
    with pytest.raises(ValueError, match="unexpected \\['extra.weight'\\]"):
        SyncNet.from_file(tmp_path / "other.model")


@pytest.mark.parametrize("shift", [0, 3, -2])
def test_the_offset_search_recovers_a_known_shift_and_its_sign(shift):
    """Audio embedding of window i made equal to the lip embedding of window i + shift: the lips of frame i match
    the audio of frame i - shift, so the offset is shift."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(60, 16, generator=g)
    lips = base[10:50]
    audio = base[10 + shift : 50 + shift]
    scores = offset_search(lips, audio, max_offset=5)
    # Windows whose partner falls past the ends meet the zero padding, so the best mean is small, not zero.
    assert scores.offset == shift and scores.sync_d < 0.1 * np.median(scores.distances) and scores.sync_c > 1.0
    assert len(scores.distances) == 11 and scores.distances.argmin() == shift + 5


def test_mfcc_framing_and_a_tone_in_its_mel_band():
    sr = 16000
    assert mfcc(np.zeros(sr), sr).shape == (1 + int(np.ceil((sr - 400) / 160)), 13)
    t = np.arange(sr) / sr
    tone = 0.3 * np.sin(2 * np.pi * 1000 * t)
    bank = mel_filterbank(sr)
    spectrum = np.abs(np.fft.rfft(tone[:400] * 32768, 512)) ** 2 / 512
    strongest = int(np.argmax(bank @ spectrum))
    centre_hz = [np.argmax(row) * sr / 512 for row in bank]
    assert abs(centre_hz[strongest] - 1000) < 150          # the filter holding 1 kHz is the one centred near it
    feats = mfcc(tone, sr)
    frame = np.append(tone[0], tone[1:400] - 0.97 * tone[:399]) * 32768
    energy = (np.abs(np.fft.rfft(frame, 512)) ** 2 / 512).sum()
    assert feats[0, 0] == pytest.approx(np.log(energy), rel=1e-9)   # c0 is the log frame energy


def test_the_scorer_runs_on_a_toy_clip_with_random_weights():
    from liveavatar.data import toy

    clip = toy.make_clip(3, 12)
    frames = lip_frames(clip.video)
    assert frames.shape == (1, 3, 12, 224, 224) and 0 <= float(frames.min()) and float(frames.max()) <= 255
    torch.manual_seed(0)
    scores = sync_scores(SyncNet().eval(), clip.video, clip.wav, 16000, 25.0, max_offset=2)
    assert np.isfinite([scores.sync_c, scores.sync_d]).all() and -2 <= scores.offset <= 2
    with pytest.raises(ValueError, match="25 fps"):
        sync_scores(SyncNet().eval(), clip.video, clip.wav, 16000, 30.0)


def test_genbench_adds_sync_scores_when_weights_are_given(tmp_path, capsys):
    from liveavatar.data import toy
    from liveavatar.evaluation.metric_set import general_metrics

    torch.manual_seed(0)
    torch.save(SyncNet().state_dict(), tmp_path / "syncnet_v2.model")
    metric = general_metrics({"syncnet": str(tmp_path / "syncnet_v2.model")})[-1]
    clip = toy.make_clip(4, 10)
    scores = metric(clip.video, clip.reference, clip.wav, 25.0, None)
    assert set(scores) == {"sync_c", "sync_d", "sync_offset"} and scores["sync_d"] > 0
    assert metric(clip.video, clip.reference, clip.wav, 30.0, None) is None
    assert len(general_metrics({"syncnet": str(tmp_path / "absent")})) == 2
    assert "warning: Sync-C/Sync-D" in capsys.readouterr().err
