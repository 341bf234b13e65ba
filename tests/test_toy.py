"""The toy world (liveavatar.data.toy) and its exact measures (liveavatar.metrics.toy)."""
import math

import numpy as np
import pytest
import torch

from liveavatar.data.toy import (
    FPS, MIN_SEPARATION, SAMPLE_RATE, audio_envelope, make_clip, mouth_region, reference_image, render,
    sample_identity,
    synth_speech,
)
from liveavatar.metrics.toy import (
    drift, estimate_identity, flicker, identity_error, lip_sync, mouth_opening, score_video,
)

HOP = SAMPLE_RATE // FPS
SEEDS = range(5)


@pytest.fixture(scope="module")
def clips():
    """Ground-truth clips of 150 frames (6 s), one per seed."""
    return {s: make_clip(s, 150) for s in SEEDS}


def _noise(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------ the world


def test_clip_is_deterministic_and_seeds_differ():
    a, b, c = make_clip(3, 20), make_clip(3, 20), make_clip(4, 20)
    assert torch.equal(a.video, b.video) and np.array_equal(a.wav, b.wav) and a.identity == b.identity
    assert not torch.equal(a.video, c.video) and not np.array_equal(a.wav, c.wav) and a.identity != c.identity


def test_shorter_clip_is_prefix_of_longer():
    short, long = make_clip(7, 30), make_clip(7, 80)
    assert torch.equal(short.video, long.video[:, :30])
    assert np.array_equal(short.wav, long.wav[: 30 * HOP])
    assert np.array_equal(short.envelope, long.envelope[:30]) and np.array_equal(short.eyes, long.eyes[:30])


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_shapes_dtypes_ranges(size):
    clip = make_clip(1, 12, size=size)
    h, w = size
    assert clip.video.shape == (3, 12, h, w) and clip.video.dtype == torch.float32
    assert clip.video.min() >= -1 and clip.video.max() <= 1
    assert clip.wav.shape == (12 * HOP,) and clip.wav.dtype == np.float32 and np.abs(clip.wav).max() <= 1
    assert clip.reference.shape == (3, h, w) and clip.reference.dtype == torch.float32
    for track in (clip.envelope, clip.mouth, clip.eyes):
        assert track.shape == (12,) and track.dtype == np.float32 and track.min() >= 0 and track.max() <= 1
    assert clip.head.shape == (12, 2)
    np.testing.assert_array_equal(clip.mouth, audio_envelope(clip.wav, 12))
    # The reference is the neutral pose of the same renderer.
    neutral = render(clip.identity, np.zeros(1), np.zeros((1, 2)), np.ones(1), size)[:, 0]
    assert torch.equal(clip.reference, neutral)


def test_identities_vary_and_faces_stand_out():
    rng = np.random.default_rng(0)
    ids = [sample_identity(rng) for _ in range(40)]
    for i in ids:
        bg = np.array(i.background)
        for c in (i.face, i.mouth, i.eyes):
            assert np.linalg.norm(bg - np.array(c)) >= MIN_SEPARATION - 1e-9
        assert np.linalg.norm(np.array(i.face) - np.array(i.mouth)) > 0.3  # the mouth is visible on the face
    backgrounds = np.array([i.background for i in ids])
    assert backgrounds.std(0).min() > 0.3  # all over the colour cube
    assert np.ptp([i.radii[0] for i in ids]) > 0.05 and np.ptp([i.center[1] for i in ids]) > 0.08
    assert np.ptp([i.shape for i in ids]) > 1.0


def test_geometry_is_in_image_units():
    identity = sample_identity(np.random.default_rng(5))
    small, large = estimate_identity(reference_image(identity, (32, 32))), estimate_identity(
        reference_image(identity, (96, 96))
    )
    assert small.face_area == pytest.approx(large.face_area, rel=0.03)
    np.testing.assert_allclose(small.face_center, large.face_center, atol=0.01)
    np.testing.assert_allclose(large.face_center, identity.center, atol=0.01)
    # Superellipse area minus the (partly face-like) dark features.
    p, (ry, rx) = identity.shape, identity.radii
    area = 4 * ry * rx * math.gamma(1 + 1 / p) ** 2 / math.gamma(1 + 2 / p)
    assert large.face_area == pytest.approx(area, rel=0.05)


def test_render_mouth_eyes_and_head():
    identity = sample_identity(np.random.default_rng(2))
    h = w = 64
    t = 5
    opening = np.linspace(0, 1, t)
    video = render(identity, opening, np.zeros((t, 2)), np.ones(t), (h, w))
    face = torch.tensor(identity.face).view(3, 1, 1, 1)
    dark = ((video - face).norm(dim=0) > 0.5).float()  # [T, H, W] mouth and eye pixels
    cy = identity.center[0] * h
    lower = dark[:, int(cy):].sum((1, 2))
    assert torch.all(lower[1:] > lower[:-1])  # the mouth grows with the opening ...
    assert torch.all(dark[:, : int(cy)].sum((1, 2)) == dark[0, : int(cy)].sum())  # ... and only the mouth
    # Blinking flattens the eyes (upper half) and leaves the mouth alone.
    eyes = np.array([1.0, 0.5, 0.05])
    blink = render(identity, np.full(3, 0.5), np.zeros((3, 2)), eyes, (h, w))
    upper = ((blink - face).norm(dim=0) > 0.5)[:, : int(cy)].sum((1, 2))
    assert upper[0] > upper[1] > upper[2]
    below = blink[:, :, int(cy) + 2 :]
    assert torch.equal(below, below[:, :1].expand_as(below))
    # Head offsets move the face by the same image-unit amount.
    moved = render(identity, np.zeros(2), np.array([[0.0, 0.0], [0.05, -0.03]]), np.ones(2), (h, w))
    c0, c1 = (estimate_identity(moved[:, i]).face_center for i in range(2))
    np.testing.assert_allclose(np.subtract(c1, c0), [0.05, -0.03], atol=0.005)


def test_mouth_region_holds_every_mouth_pixel_and_follows_the_head():
    clip = make_clip(11, 40)
    region = mouth_region(clip.identity, clip.head)
    assert region.shape == (40, 32, 32) and 0.0 <= region.min() and region.max() <= 1.0
    # Every pixel an opening mouth paints (against the same frames with the mouth shut) lies in the region.
    shut = render(clip.identity, np.zeros(40), clip.head, clip.eyes)
    wide = render(clip.identity, np.ones(40), clip.head, clip.eyes)
    painted = (wide - shut).abs().amax(0) > 1e-3
    assert painted.any() and bool((region[painted] > 0).all())
    assert region.sum((1, 2)).min() < 0.1 * 32 * 32   # a few percent of the frame, not the face
    # It moves with the head: centres of mass follow the head's vertical offset in pixels.
    ys = torch.arange(32, dtype=torch.float32)
    centre = (region.sum(2) * ys).sum(1) / region.sum((1, 2))
    head_px = torch.as_tensor(clip.head[:, 0] * 32, dtype=torch.float32)
    torch.testing.assert_close(centre - centre[0], head_px - head_px[0], atol=0.15, rtol=0)


def test_head_motion_is_slow_and_blinks_are_short(clips):
    for clip in clips.values():
        step = np.abs(np.diff(clip.head, axis=0)).max()
        assert 0 < step < 0.01 and np.abs(clip.head).max() < 0.06  # well under a pixel a frame at 32x32
        closed = clip.eyes < 0.5
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, closed.astype(int), 0])))[::2]
        assert 1 <= len(runs) <= 6 and runs.max() <= 4  # a 6 s clip: a blink every 2-4 s, 2-4 frames each


# ------------------------------------------------------------------------------------------------ audio


def test_speech_has_syllables_and_pauses(clips):
    for clip in clips.values():
        env = clip.envelope
        assert env.max() > 0.7 and (env == 0).sum() >= 10
        silent = np.r_[0, (env < 0.02).astype(int), 0]
        runs = np.diff(np.flatnonzero(np.diff(silent)))[::2]
        assert runs.max() >= 4  # a pause of at least 0.16 s
        # Mouth shapes change at syllable rate: several rises of the envelope.
        rises = np.sum((env[1:] > 0.3) & (env[:-1] <= 0.3))
        assert rises >= 3


def test_speech_pitch_and_band():
    for seed in SEEDS:
        wav = synth_speech(np.random.default_rng(seed), 3.0)
        assert wav.dtype == np.float32 and wav.shape == (3 * SAMPLE_RATE,)
        env = audio_envelope(wav, 3 * FPS)
        i = max(int(np.argmax(env)), 1)
        seg = wav[(i - 1) * HOP : (i + 1) * HOP].astype(np.float64)
        ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
        lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
        f0 = SAMPLE_RATE / (lo + np.argmax(ac[lo:hi]))
        assert 75 <= f0 <= 300, f0
        spectrum = np.abs(np.fft.rfft(wav)) ** 2
        freqs = np.fft.rfftfreq(len(wav), 1 / SAMPLE_RATE)
        assert spectrum[freqs < 4000].sum() > 0.98 * spectrum.sum()
        assert 100 <= freqs[np.argmax(spectrum)] <= 1000  # the strongest harmonic sits near the first formant


def test_envelope_follows_the_toy_audio_features():
    from liveavatar.models.audio import EnergyMelFeatures

    clip = make_clip(6, 60)
    energy = EnergyMelFeatures()(clip.wav, 60)[0, :, 0, -1].numpy()  # natural-log power of the same window
    inside = (clip.envelope > 0.02) & (clip.envelope < 0.98)
    slope, offset = np.polyfit(energy[inside], clip.envelope[inside], 1)
    assert slope > 0
    np.testing.assert_allclose(slope * energy[inside] + offset, clip.envelope[inside], atol=0.01)


# ------------------------------------------------------------------------------------------------ metrics


def test_estimate_identity_reads_the_reference_back():
    clip = make_clip(8, 1)
    est = estimate_identity(clip.reference)
    np.testing.assert_allclose(est.background, clip.identity.background, atol=1e-5)
    np.testing.assert_allclose(est.face, clip.identity.face, atol=0.02)
    np.testing.assert_allclose(est.face_center, clip.identity.center, atol=0.01)


def test_ground_truth_lip_sync_is_high(clips):
    rs = [lip_sync(c.video, c.reference, c.wav) for c in clips.values()]
    assert min(rs) > 0.95, rs  # measured 0.9999+: the opening is read back through head motion and blinks


def test_mouth_opening_ignores_head_motion_and_blinks(clips):
    clip = clips[0]
    still = render(clip.identity, np.full(150, 0.6), clip.head, clip.eyes)
    opening = mouth_opening(still, clip.reference)
    assert opening.std() < 0.01 * opening.mean()
    # And it is linear in the rendered opening.
    ramp = np.linspace(0, 1, 150)
    read = mouth_opening(render(clip.identity, ramp, clip.head, clip.eyes), clip.reference)
    assert np.corrcoef(ramp, read)[0, 1] > 0.999


def test_measures_tolerate_pixel_noise_and_blur(clips):
    clip = clips[3]
    noisy = (clip.video + 0.1 * torch.randn(clip.video.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    frames = clip.video.transpose(0, 1)  # [T, 3, H, W]
    blurred = torch.nn.functional.avg_pool2d(frames, 3, stride=1, padding=1, count_include_pad=False).transpose(0, 1)
    for video in (noisy, blurred):
        assert lip_sync(video, clip.reference, clip.wav) > 0.95
        assert identity_error(video, clip.reference).mean() < 0.15  # measured about 0.06 (noise), 0.1 (blur)


def test_wrong_audio_scores_low_lip_sync(clips):
    rs = []
    for s, clip in clips.items():
        other = clips[(s + 1) % len(clips)]
        dubbed = render(clip.identity, other.mouth, clip.head, clip.eyes)  # mouth driven by another clip's audio
        rs.append(lip_sync(dubbed, clip.reference, clip.wav))
    assert max(np.abs(rs)) < 0.5 and abs(np.mean(rs)) < 0.25, rs


def test_identity_error_true_vs_other_vs_noise(clips):
    for s, clip in clips.items():
        other = clips[(s + 1) % len(clips)]
        true = identity_error(clip.video, clip.reference)
        assert true.shape == (150,) and true.max() < 0.05  # measured at most 0.02
        assert identity_error(clip.video, other.reference).mean() > 0.3  # measured 0.5-1.6
        assert identity_error(clip.reference[:, None], clip.reference)[0] == 0
        noise = _noise(clip.video.shape, s)
        assert identity_error(noise, clip.reference).mean() > 2.0  # measured 2.5-4.9
        assert abs(lip_sync(noise, clip.reference, clip.wav)) < 0.3


def test_flicker_of_shuffled_frames(clips):
    for s, clip in clips.items():
        perm = torch.randperm(150, generator=torch.Generator().manual_seed(s))
        true, shuffled = flicker(clip.video), flicker(clip.video[:, perm])
        assert 0 < true < 0.02 and shuffled > 3 * true
        assert flicker(_noise(clip.video.shape, s)) > 0.5


def test_drift_of_a_fading_video(clips):
    clip = clips[1]
    fade = torch.linspace(0, 0.5, 150).view(1, -1, 1, 1)
    faded = clip.video * (1 - fade)  # colours slide towards grey over time
    true = drift(identity_error(clip.video, clip.reference), 30)
    faded_drift = drift(identity_error(faded, clip.reference), 30)
    assert faded_drift > 0.1 and faded_drift > true + 0.1 and abs(true) < 0.01
    assert drift(np.arange(10.0), 2) == pytest.approx(8.0) and drift(np.ones(1), 5) == 0.0


def test_score_video_and_garbage_in():
    clip = make_clip(2, 40)
    scores = score_video(clip.video, clip.reference, clip.wav)
    assert scores.lip_sync > 0.95 and scores.identity_error < 0.05 and abs(scores.identity_drift) < 0.01
    assert set(scores.to_dict()) == {"lip_sync", "identity_error", "identity_drift", "flicker"}
    for garbage in (torch.full_like(clip.video, float("nan")), torch.zeros_like(clip.video), clip.video[:, :1]):
        values = score_video(garbage, clip.reference, clip.wav).to_dict()
        assert all(math.isfinite(v) for v in values.values()), values
    assert score_video(torch.zeros_like(clip.video), clip.reference, clip.wav).lip_sync == 0.0
    with pytest.raises(ValueError, match="frame size"):
        lip_sync(clip.video, make_clip(2, 1, size=(16, 16)).reference, clip.wav)
