"""The toy world: a procedural talking avatar whose renderer is known, so generated videos can be scored exactly.

A clip is an identity (colours, face shape, size and position), speech-like audio at :data:`SAMPLE_RATE` (voiced
syllables with a pitch, formants and pauses), and a video at :data:`FPS` (or any other rate) whose mouth opening
is a deterministic function of the audio loudness (:func:`audio_envelope`), with slow head drift and blinks. Everything is drawn from one
seed, and a shorter clip of a seed is a prefix of a longer one (audio, envelope, head motion, blinks, video).

Conventions: colours are in the video's ``[-1, 1]`` units; geometry is in image units (``y, x`` in
``[0, 1]``, radii as fractions of the image height and width), so any frame size renders the same scene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import media

# The toy world's rates, read by the renderer here and by the metrics (liveavatar.metrics.toy): the package's own.
SAMPLE_RATE = media.SAMPLE_RATE
FPS = media.VIDEO_FPS

# Loudness range mapped onto the mouth opening: quieter than FLOOR_DB is closed, louder than TOP_DB fully open.
FLOOR_DB = -42.0
TOP_DB = -14.0

# Least L2 distance (rgb, [-1, 1] units) between the background and the face, mouth and eye colours, so the face
# and its features stand out; the metrics derive their foreground threshold from it.
MIN_SEPARATION = 0.9

# Face layout, as fractions of the face radii (ry, rx), measured from the face centre.
MOUTH_Y = 0.45  # mouth centre below the face centre
MOUTH_HALF_HEIGHT = (0.03, 0.23)  # closed (a thin line) .. fully open
EYE_Y = -0.3  # eye centres above the face centre
EYE_HALF_HEIGHT = 0.12  # open eye
EYE_HALF_WIDTH = 0.12

_SUBSAMPLES = 4  # horizontal sub-samples per pixel for anti-aliasing (vertical coverage is exact)

# Conversations (``make_clip(..., conversation=True)``): turns of 1-3 s alternate between the avatar and an
# interlocutor; while listening, the mouth stays closed and the head nods down by up to NOD image units, following
# the other voice's loudness smoothed over NOD_SMOOTH_S (causally: a nod answers what was heard).
TURN_S = (1.0, 3.0)
NOD = 0.04
NOD_SMOOTH_S = 0.15


@dataclass(frozen=True)
class Identity:
    """What stays fixed over a clip. Colours ``(r, g, b)`` in ``[-1, 1]``; ``center`` ``(y, x)`` and
    ``radii`` ``(ry, rx)`` in image units; ``shape`` the superellipse exponent of the face outline (2: ellipse,
    larger: rounder square); ``mouth_width`` and ``eye_spacing`` as fractions of ``rx``."""

    background: tuple[float, float, float]
    face: tuple[float, float, float]
    mouth: tuple[float, float, float]
    eyes: tuple[float, float, float]
    center: tuple[float, float]
    radii: tuple[float, float]
    shape: float = 2.0
    mouth_width: float = 0.4
    eye_spacing: float = 0.4


def _to_signed(rgb01: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in rgb01 * 2.0 - 1.0)


def sample_identity(rng: np.random.Generator) -> Identity:
    """A random identity: a bright face of any hue, dark mouth and eyes, and a background of any colour that is
    at least :data:`MIN_SEPARATION` away from all three; face shape, size and position vary."""
    face = rng.uniform(0.4, 1.0, 3)
    mouth = rng.uniform(0.0, 0.2, 3)
    eyes = rng.uniform(0.0, 0.2, 3)
    # Rejection sampling keeps the background's distribution otherwise uniform over the rgb cube; the allowed
    # region is large, so this takes a few draws.
    for _ in range(10_000):
        background = rng.uniform(0.0, 1.0, 3)
        if min(np.linalg.norm(background - c) for c in (face, mouth, eyes)) * 2.0 >= MIN_SEPARATION:
            break
    else:  # pragma: no cover - the allowed region is never empty for the ranges above
        raise RuntimeError("toy world: no background colour separated from the face")
    center = (float(rng.uniform(0.46, 0.54)), float(rng.uniform(0.42, 0.58)))
    radii = (float(rng.uniform(0.26, 0.36)), float(rng.uniform(0.2, 0.34)))
    return Identity(
        background=_to_signed(background), face=_to_signed(face), mouth=_to_signed(mouth), eyes=_to_signed(eyes),
        center=center, radii=radii, shape=float(rng.uniform(2.0, 4.0)),
        mouth_width=float(rng.uniform(0.3, 0.5)), eye_spacing=float(rng.uniform(0.3, 0.45)),
    )


# ---------------------------------------------------------------------------------------------------- audio


def _syllable(rng: np.random.Generator, f0: float, sample_rate: int) -> np.ndarray:
    """One voiced syllable: harmonics of a gliding pitch shaped by three formant peaks, under an attack-decay
    envelope, with a short noise burst at the onset (a consonant). Unit-ish RMS at its peak, float64."""
    duration = rng.uniform(0.1, 0.3)
    n = max(1, int(duration * sample_rate))
    t = np.arange(n) / n
    glide = rng.uniform(-0.12, 0.12)
    pitch = f0 * (1.0 + glide * (t - 0.5))  # Hz, a slow rise or fall within the syllable
    phase = 2.0 * np.pi * np.cumsum(pitch) / sample_rate
    formants = np.array([rng.uniform(300, 900), rng.uniform(900, 2400), rng.uniform(2400, 3300)])
    bandwidths = np.array([90.0, 120.0, 180.0])
    gains = np.array([1.0, 0.6, 0.3])
    harmonics = np.arange(1, int(3800 // f0) + 1)
    freqs = harmonics * f0
    amps = (gains * np.exp(-0.5 * ((freqs[:, None] - formants) / bandwidths) ** 2)).sum(1)
    amps += 0.05 / harmonics  # glottal tilt, so every harmonic is present
    voiced = (amps[:, None] * np.sin(harmonics[:, None] * phase[None])).sum(0)
    voiced /= np.sqrt(np.mean(voiced**2)) + 1e-12
    # Attack-decay: t^a (1 - t)^b peaking at a / (a + b), normalised to a peak of 1.
    a, b = rng.uniform(0.6, 2.0), rng.uniform(0.8, 2.5)
    peak = a / (a + b)
    shape = (t**a * (1 - t) ** b) / (peak**a * (1 - peak) ** b)
    out = voiced * shape
    burst = int(rng.uniform(0.005, 0.03) * sample_rate)
    if rng.random() < 0.5 and burst < n:
        out[:burst] += rng.normal(0.0, rng.uniform(0.1, 0.4), burst) * np.linspace(1.0, 0.0, burst)
    return out


def synth_speech(rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like audio ``float32 [round(seconds * sample_rate)]`` in ``[-1, 1]``: phrases of 1-6 syllables
    (0.1-0.3 s each, short gaps between them) separated by pauses of 0.15-0.9 s, one speaker's pitch
    (100-250 Hz) drifting slowly, and a faint noise floor. The events are drawn in time order, so a shorter
    call with the same generator state returns a prefix of a longer one."""
    total = int(round(seconds * sample_rate))
    noise_rng = np.random.default_rng(rng.integers(2**63))  # its own stream, so the floor is prefix-stable
    speaker_f0 = rng.uniform(100.0, 250.0)
    out = np.zeros(total + 1, dtype=np.float64)
    pos = int(rng.uniform(0.0, 0.4) * sample_rate)  # lead-in silence
    while pos < total:
        phrase_f0 = speaker_f0 * rng.uniform(0.9, 1.1)
        syllables = int(rng.integers(1, 7))
        for k in range(syllables):
            f0 = phrase_f0 * (1.0 - 0.04 * k) * rng.uniform(0.95, 1.05)  # declination over the phrase
            level = 0.2 * rng.uniform(0.35, 1.0)  # stress: RMS at the syllable's peak
            syl = level * _syllable(rng, f0, sample_rate)
            end = min(pos + len(syl), total)
            if end > pos:
                out[pos:end] += syl[: end - pos]
            pos += len(syl) + int(rng.uniform(0.0, 0.06) * sample_rate)
        pos += int(rng.uniform(0.15, 0.9) * sample_rate)
    out = out[:total] + noise_rng.normal(0.0, 3e-4, total)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def audio_envelope(wav: np.ndarray, frames: int, sample_rate: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """Loudness per video frame ``float32 [frames]`` in ``[0, 1]``.

    Frame ``i`` is measured over the two-hop window ``[(i - 1) hop, (i + 1) hop)`` (``hop = sample_rate / fps``,
    zeros outside the audio) -- the window the toy audio features (``EnergyMelFeatures``) use for frame ``i``,
    so the envelope is a clipped affine function of their log energy, and the two-hop window is the light
    smoothing. The mean power in dB maps linearly from :data:`FLOOR_DB` (0) to :data:`TOP_DB` (1)."""
    hop = int(round(sample_rate / fps))
    wav = np.asarray(wav, dtype=np.float64).ravel()
    padded = np.zeros((frames + 1) * hop, dtype=np.float64)
    n = min(len(wav), frames * hop)
    padded[hop : hop + n] = wav[:n]
    power = (padded.reshape(frames + 1, hop) ** 2).mean(1)
    window = 0.5 * (power[:-1] + power[1:])  # the two hops of each frame's window
    db = 10.0 * np.log10(window + 1e-12)
    return np.clip((db - FLOOR_DB) / (TOP_DB - FLOOR_DB), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- motion


def head_motion(rng: np.random.Generator, frames: int, fps: float = FPS) -> np.ndarray:
    """Slow head drift ``float32 [frames, 2]`` (``y, x`` offsets in image units): per axis two sinusoids with
    periods of 2-10 s and random phases, at most 0.02-0.05 of the image."""
    t = np.arange(frames) / fps
    out = np.zeros((frames, 2))
    for axis in range(2):
        amplitude = rng.uniform(0.02, 0.05)
        weights = rng.dirichlet([2.0, 2.0])
        for w in weights:
            period, phase = rng.uniform(2.0, 10.0), rng.uniform(0.0, 2.0 * np.pi)
            out[:, axis] += amplitude * w * np.sin(2.0 * np.pi * t / period + phase)
    return out.astype(np.float32)


def blinks(rng: np.random.Generator, frames: int, fps: float = FPS) -> np.ndarray:
    """Eye openness ``float32 [frames]`` in ``[0, 1]``: open, with blinks of 2-4 frames every 2-4 s (the first
    within 0.3-3 s), each closing along half a sine."""
    eyes = np.ones(frames, dtype=np.float32)
    start = rng.uniform(0.3, 3.0)
    while int(start * fps) < frames:
        length = int(rng.integers(2, 5))
        first = int(start * fps)
        closing = 0.95 * np.sin(np.pi * np.arange(1, length + 1) / (length + 1))
        span = slice(first, min(first + length, frames))
        eyes[span] = (1.0 - closing)[: span.stop - span.start]
        start += rng.uniform(2.0, 4.0)
    return eyes


def conversation_turns(rng: np.random.Generator, frames: int, fps: float = FPS) -> np.ndarray:
    """Who holds the turn ``bool [frames]`` (True: the avatar speaks): alternating turns of :data:`TURN_S` seconds,
    the first side drawn at random; drawn in time order, so a shorter call is a prefix of a longer one."""
    speaking = np.zeros(frames, dtype=bool)
    side, start = bool(rng.random() < 0.5), 0
    while start < frames:
        length = max(1, int(rng.uniform(*TURN_S) * fps))
        speaking[start : start + length] = side
        side, start = not side, start + length
    return speaking


def listening_nod(other_envelope: np.ndarray, speaking: np.ndarray, fps: float = FPS) -> np.ndarray:
    """Downward head offset ``float32 [frames]`` while listening: the other voice's loudness, smoothed causally
    (one-pole, time constant :data:`NOD_SMOOTH_S`), times :data:`NOD`; 0 while speaking."""
    alpha = 1.0 - np.exp(-1.0 / (NOD_SMOOTH_S * fps))
    level, out = 0.0, np.zeros(len(other_envelope), dtype=np.float32)
    for i, e in enumerate(other_envelope):
        level += alpha * (float(e) - level)
        out[i] = 0.0 if speaking[i] else NOD * level
    return out


# ---------------------------------------------------------------------------------------------------- render


def _coverage(cy, cx, ry, rx, p, size: tuple[int, int]) -> torch.Tensor:
    """Anti-aliased superellipses ``|y/ry|^p + |x/rx|^p <= 1``: fraction of each pixel covered, ``[B, H, W]``.

    ``cy, cx, ry, rx`` are ``[B]`` tensors in pixel units (pixel ``i`` spans ``[i, i + 1]``), ``p`` a float
    or ``[B]``. The vertical overlap of each pixel with the shape is exact; horizontally the shape is sampled
    at :data:`_SUBSAMPLES` points per pixel. So the covered area is linear in ``ry`` down to zero height
    (a closing mouth shrinks smoothly) and the image is smooth under sub-pixel motion."""
    h, w = size
    xs = (torch.arange(w * _SUBSAMPLES, dtype=torch.float32) + 0.5) / _SUBSAMPLES  # [W*S]
    p = torch.as_tensor(p, dtype=torch.float32).reshape(-1, 1)
    u = ((xs[None] - cx[:, None]).abs() / rx[:, None].clamp_min(1e-6)).clamp(max=1.0)
    half = ry[:, None] * (1.0 - u**p).clamp_min(0.0) ** (1.0 / p)  # [B, W*S] half-height at each x sample
    top, bottom = (cy[:, None] - half)[:, None], (cy[:, None] + half)[:, None]  # [B, 1, W*S]
    rows = torch.arange(h, dtype=torch.float32)[None, :, None]  # [1, H, 1]
    overlap = (torch.minimum(rows + 1.0, bottom) - torch.maximum(rows, top)).clamp(0.0, 1.0)  # [B, H, W*S]
    return overlap.reshape(-1, h, w, _SUBSAMPLES).mean(-1)


def _over(image: torch.Tensor, color, alpha: torch.Tensor) -> torch.Tensor:
    """Composite ``color`` with coverage ``alpha [T, H, W]`` over ``image [3, T, H, W]``."""
    c = torch.tensor(color, dtype=torch.float32).view(3, 1, 1, 1)
    return image + (c - image) * alpha[None]


def render(
    identity: Identity, mouth: np.ndarray, head: np.ndarray, eyes: np.ndarray, size: tuple[int, int] = (32, 32)
) -> torch.Tensor:
    """Frames ``float32 [3, T, H, W]`` in ``[-1, 1]`` of ``identity`` with mouth opening ``mouth [T]`` in
    ``[0, 1]``, head offset ``head [T, 2]`` (``y, x``, image units) and eye openness ``eyes [T]`` in ``[0, 1]``.
    All frames at once: background, face, eyes, mouth composited with soft (one-pixel) edges."""
    h, w = size
    mouth = torch.as_tensor(np.asarray(mouth), dtype=torch.float32).reshape(-1)
    eyes = torch.as_tensor(np.asarray(eyes), dtype=torch.float32).reshape(-1)
    head = torch.as_tensor(np.asarray(head), dtype=torch.float32).reshape(-1, 2)
    t = mouth.shape[0]
    if eyes.shape[0] != t or head.shape[0] != t:
        raise ValueError(f"render: mouth {t}, eyes {eyes.shape[0]} and head {head.shape[0]} frames differ")
    ry, rx = identity.radii[0] * h, identity.radii[1] * w
    cy = (identity.center[0] + head[:, 0]) * h
    cx = (identity.center[1] + head[:, 1]) * w
    full = torch.ones(t)

    image = torch.tensor(identity.background, dtype=torch.float32).view(3, 1, 1, 1).expand(3, t, h, w)
    image = _over(image, identity.face, _coverage(cy, cx, ry * full, rx * full, identity.shape, size))

    eye_dx = identity.eye_spacing * rx
    eye_cy = (cy + EYE_Y * ry).repeat(2)
    eye_cx = torch.cat([cx - eye_dx, cx + eye_dx])
    eye_ry = (EYE_HALF_HEIGHT * ry * eyes.clamp(0.0, 1.0)).repeat(2)
    eye_cov = _coverage(eye_cy, eye_cx, eye_ry, EYE_HALF_WIDTH * rx * torch.ones(2 * t), 2.0, size)
    image = _over(image, identity.eyes, eye_cov.view(2, t, h, w).sum(0).clamp(max=1.0))

    lo, hi = MOUTH_HALF_HEIGHT
    mouth_ry = (lo + (hi - lo) * mouth.clamp(0.0, 1.0)) * ry
    mouth_cov = _coverage(cy + MOUTH_Y * ry, cx, mouth_ry, identity.mouth_width * rx * full, 2.0, size)
    return _over(image, identity.mouth, mouth_cov).contiguous()


def mouth_region(identity: Identity, head: np.ndarray, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Where the mouth can be, per frame: ``float32 [T, H, W]`` in ``[0, 1]``, the coverage of the fully open mouth
    with the head at ``head [T, 2]`` -- the pixels whose colour the audio decides (``loss.mouth_weight``)."""
    h, w = size
    head = torch.as_tensor(np.asarray(head), dtype=torch.float32).reshape(-1, 2)
    full = torch.ones(head.shape[0])
    ry, rx = identity.radii[0] * h, identity.radii[1] * w
    cy, cx = (identity.center[0] + head[:, 0]) * h, (identity.center[1] + head[:, 1]) * w
    return _coverage(cy + MOUTH_Y * ry, cx, MOUTH_HALF_HEIGHT[1] * ry * full, identity.mouth_width * rx * full, 2.0, size)


def reference_image(identity: Identity, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """The neutral pose ``[3, H, W]``: mouth closed, eyes open, head centred."""
    return render(identity, np.zeros(1), np.zeros((1, 2)), np.ones(1), size)[:, 0]


# ---------------------------------------------------------------------------------------------------- clips


@dataclass
class ToyClip:
    """One clip: ``video [3, T, H, W]`` float32 in ``[-1, 1]``, ``wav float32 [T * sample_rate / fps]``,
    ``reference [3, H, W]`` (the identity's neutral pose), ``envelope`` and ``mouth`` ``float32 [T]`` (equal:
    the mouth follows the loudness), ``head float32 [T, 2]``, ``eyes float32 [T]``."""

    video: torch.Tensor
    wav: np.ndarray
    reference: torch.Tensor
    identity: Identity
    envelope: np.ndarray
    mouth: np.ndarray
    head: np.ndarray
    eyes: np.ndarray
    fps: float = FPS
    sample_rate: int = SAMPLE_RATE
    # Conversations only: the interlocutor's voice (same length as ``wav``, silent during the avatar's turns) and
    # who holds the turn per video frame (``wav`` is then silent during the other's turns).
    listen_wav: np.ndarray | None = None
    speaking: np.ndarray | None = None


def make_clip(
    seed: int, frames: int, size: tuple[int, int] = (32, 32), fps: float = FPS, sample_rate: int = SAMPLE_RATE,
    conversation: bool = False,
) -> ToyClip:
    """The clip of ``seed`` with ``frames`` video frames. Deterministic; identity, audio, head motion and blinks
    come from independent streams of the seed, so ``make_clip(s, n)`` is a prefix of ``make_clip(s, m > n)``.

    ``conversation``: the avatar talks in its turns and listens in the interlocutor's (:func:`conversation_turns`):
    its own voice is cut to its turns, the other voice (another speaker) to the other turns, the mouth follows the
    own voice only, and while listening the head nods with the other voice (:func:`listening_nod`)."""
    id_rng, audio_rng, head_rng, blink_rng, other_rng, turn_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )
    identity = sample_identity(id_rng)
    hop = int(round(sample_rate / fps))
    wav = synth_speech(audio_rng, frames * hop / sample_rate, sample_rate)
    head = head_motion(head_rng, frames, fps)
    eyes = blinks(blink_rng, frames, fps)
    listen_wav = speaking = None
    if conversation:
        speaking = conversation_turns(turn_rng, frames, fps)
        own_turn = np.repeat(speaking, hop)[: len(wav)].astype(np.float32)
        listen_wav = synth_speech(other_rng, frames * hop / sample_rate, sample_rate) * (1.0 - own_turn)
        wav = wav * own_turn
    envelope = audio_envelope(wav, frames, sample_rate, fps)
    mouth = envelope.copy()
    if conversation:
        mouth[~speaking] = 0.0  # listening: the mouth stays closed (whatever bleeds over a turn's edge)
        head = head.copy()
        head[:, 0] += listening_nod(audio_envelope(listen_wav, frames, sample_rate, fps), speaking, fps)
    video = render(identity, mouth, head, eyes, size)
    return ToyClip(
        video=video, wav=wav, reference=reference_image(identity, size), identity=identity,
        envelope=envelope, mouth=mouth, head=head, eyes=eyes, fps=fps, sample_rate=sample_rate,
        listen_wav=listen_wav, speaking=speaking,
    )
