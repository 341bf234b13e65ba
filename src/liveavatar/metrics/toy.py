"""GenBench-toy: exact measures of any generated toy-world video, given only the reference image and the audio.

The toy renderer (:mod:`liveavatar.data.toy`) is known, so the measures read the scene back from pixels:
the background is the colour of the image border, the face the dominant colour that differs from it, the face
silhouette tells where the head is in every frame, and the mouth opening is the amount of dark (mouth-coloured)
paint in the lower half of the face. Nothing here needs weights, and every measure returns finite numbers for
any input, pure noise included.

Videos are ``[3, T, H, W]`` float in ``[-1, 1]`` (torch or numpy); images ``[3, H, W]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from liveavatar.data.toy import (
    EYE_HALF_HEIGHT, EYE_Y, FPS, MIN_SEPARATION, MOUTH_HALF_HEIGHT, MOUTH_Y, SAMPLE_RATE, audio_envelope,
)

# A pixel further than this (L2 over rgb, [-1, 1] units) from the background is foreground. A third of the
# world's least background separation: blends of up to a third face are still background, so edges cannot
# pull the face colour estimate.
FOREGROUND = MIN_SEPARATION / 3.0

# Where the silhouette ramps from background to face, as a fraction of the face's distance from the background.
SILHOUETTE_RAMP = (0.2, 0.8)

# The face interior searched for the mouth, as a fraction of the face's half extents: inside the outline of
# any face shape the world draws (the outline passes 0.76 of the half height at the mouth's widest corner for
# an ellipse), and around the largest mouth (at most 0.7 of the inner ellipse).
INTERIOR = 0.85
# The mouth search starts midway between the lowest eyelid and the top of the widest-open mouth, so blinks
# never count as mouth and an open mouth is never cut.
MOUTH_TOP = 0.5 * ((EYE_Y + EYE_HALF_HEIGHT) + (MOUTH_Y - MOUTH_HALF_HEIGHT[1]))


def _frames(video, name: str = "video") -> torch.Tensor:
    """``[3, T, H, W]`` -> ``[T, 3, H, W]`` float32 with NaNs and infinities replaced (garbage in, numbers out)."""
    v = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).detach()
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"{name}: expected [3, T, H, W], got {tuple(v.shape)}")
    return torch.nan_to_num(v.float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0).permute(1, 0, 2, 3).contiguous()


def _image(image, name: str = "reference") -> torch.Tensor:
    """``[3, H, W]`` -> ``[1, 3, H, W]``."""
    i = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).detach()
    if i.ndim != 3 or i.shape[0] != 3:
        raise ValueError(f"{name}: expected [3, H, W], got {tuple(i.shape)}")
    return _frames(i[:, None], name)


def _pair(video, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Video ``[T, 3, H, W]`` and reference ``[1, 3, H, W]`` of the same frame size."""
    frames, ref = _frames(video), _image(reference)
    if frames.shape[-2:] != ref.shape[-2:]:
        raise ValueError(f"reference: frame size {tuple(ref.shape[-2:])} differs from the video's "
                         f"{tuple(frames.shape[-2:])}")
    return frames, ref


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm over the (short, rgb) ``dim``; faster than ``Tensor.norm`` on the CPU for a 3-long axis."""
    return (x * x).sum(dim).sqrt()


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in pixel units, ``[H, 1]`` and ``[1, W]``."""
    return (torch.arange(h, dtype=torch.float32) + 0.5)[:, None], (torch.arange(w, dtype=torch.float32) + 0.5)[None]


@dataclass
class _Scene:
    """Per-frame read-back (batched): ``background``/``face`` ``[T, 3]``, ``silhouette [T, H, W]`` (how much of
    each pixel is foreground), ``area [T]`` (pixels), ``center [T, 2]`` (``y, x`` in pixels)."""

    background: torch.Tensor
    face: torch.Tensor
    silhouette: torch.Tensor
    area: torch.Tensor
    center: torch.Tensor


def _silhouette(frames: torch.Tensor, background: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Foreground fraction per pixel ``[T, H, W]``: distance from the background colour over the face's own
    distance from it (the face's coverage along anti-aliased edges), ramped from :data:`SILHOUETTE_RAMP`
    ``[0]`` (0) to ``[1]`` (1). The ramp is symmetric about a half-covered pixel, so edges keep their area and
    centre on average (within a few percent of the area), and pixel noise on the background or face (up to a
    fifth of their separation) adds none."""
    dist = _norm(frames - background[:, :, None, None], 1)
    scale = _norm(face - background, 1).clamp_min(FOREGROUND)[:, None, None]
    lo, hi = SILHOUETTE_RAMP
    return ((dist / scale - lo) / (hi - lo)).clamp(0.0, 1.0)


def _centroid(weights: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``[T, 2]`` (pixels) of ``weights [T, H, W]``; the image centre where there is none."""
    t, h, w = weights.shape
    ys, xs = _grid(h, w)
    mass = weights.sum((1, 2))
    empty = mass < 1e-6
    mass = mass.clamp_min(1e-6)
    center = torch.stack([(weights * ys).sum((1, 2)) / mass, (weights * xs).sum((1, 2)) / mass], dim=1)
    center[empty] = torch.tensor([h / 2.0, w / 2.0])
    return center


def _read(frames: torch.Tensor) -> _Scene:
    """Background = per-channel median of the one-pixel border; face = per-channel median of the foreground
    pixels (the background where there are none); then the silhouette, its area and its centre."""
    t, _, h, w = frames.shape
    border = torch.cat(
        [frames[:, :, 0], frames[:, :, -1], frames[:, :, 1:-1, 0], frames[:, :, 1:-1, -1]], dim=2
    )  # [T, 3, border pixels]
    background = border.median(dim=2).values
    flat = frames.reshape(t, 3, -1)
    foreground = _norm(flat - background[:, :, None], 1) > FOREGROUND  # [T, H*W]
    masked = torch.where(foreground[:, None], flat, torch.full_like(flat, float("nan")))
    face = masked.nanmedian(dim=2).values
    face = torch.where(torch.isnan(face), background, face)
    sil = _silhouette(frames, background, face)
    return _Scene(background, face, sil, sil.sum((1, 2)), _centroid(sil))


@dataclass
class IdentityEstimate:
    """What an image shows of an identity: ``background`` and ``face`` rgb in ``[-1, 1]``, ``face_area`` as a
    fraction of the image, ``face_center`` ``(y, x)`` in image units."""

    background: tuple[float, float, float]
    face: tuple[float, float, float]
    face_area: float
    face_center: tuple[float, float]


def estimate_identity(image) -> IdentityEstimate:
    """Read the identity back from one image ``[3, H, W]`` in ``[-1, 1]``: background from the border pixels,
    face as the dominant colour that differs from it, face area and centre from the soft silhouette."""
    frames = _image(image, "image")
    h, w = frames.shape[-2:]
    s = _read(frames)
    return IdentityEstimate(
        background=tuple(float(v) for v in s.background[0]), face=tuple(float(v) for v in s.face[0]),
        face_area=float(s.area[0]) / (h * w), face_center=(float(s.center[0, 0]) / h, float(s.center[0, 1]) / w),
    )


def _ellipse(center: torch.Tensor, radii: tuple[float, float], h: int, w: int) -> torch.Tensor:
    """Soft inside-ellipse weights ``[T, H, W]`` around ``center [T, 2]`` with half axes ``radii`` (pixels),
    ramping over about one pixel so the weights move smoothly with the centre."""
    ys, xs = _grid(h, w)
    dy = (ys[None] - center[:, 0, None, None]) / radii[0]
    dx = (xs[None] - center[:, 1, None, None]) / radii[1]
    return ((1.0 - (dy**2 + dx**2).sqrt()) * min(radii) + 0.5).clamp(0.0, 1.0)


def _extent(silhouette: torch.Tensor) -> tuple[float, float]:
    """Soft half extents ``(ry, rx)`` in pixels of one silhouette ``[H, W]`` (rows, columns it touches)."""
    return max(0.5, float(silhouette.amax(1).sum()) / 2.0), max(0.5, float(silhouette.amax(0).sum()) / 2.0)


def mouth_opening(video, reference) -> np.ndarray:
    """Mouth opening per frame ``float64 [T]``, recovered from pixels: the mouth paint (how far each pixel has
    moved from the frame's face colour towards the reference's darkest feature colour, ``[0, 2]``) summed over
    the lower face interior and divided by the reference face area -- about the mouth's fraction of the face.

    The face is located per frame (centroid of its silhouette against the reference background), so head
    motion is followed; the window starts below the eyes (:data:`MOUTH_TOP`), so blinks do not count; the
    face colour is re-read per frame, so a slow colour drift does not read as an opening."""
    frames, ref = _pair(video, reference)
    t, _, h, w = frames.shape
    r = _read(ref)
    ry, rx = _extent(r.silhouette[0])
    interior = (INTERIOR * ry, INTERIOR * rx)
    ref_inside = _ellipse(r.center, interior, h, w)[0] > 0.5
    # The darkest feature of the reference (an open eye's centre): the direction of "mouth paint".
    dist = _norm(ref[0] - r.face[0][:, None, None], 0)
    dist = torch.where(ref_inside, dist, torch.zeros_like(dist))
    dark = ref[0].reshape(3, -1)[:, int(dist.argmax())]

    center = _centroid(_silhouette(frames, r.background.expand(t, 3), r.face.expand(t, 3)))
    inside = _ellipse(center, interior, h, w)  # [T, H, W]
    flat = frames.reshape(t, 3, -1)
    masked = torch.where((inside > 0.5).reshape(t, 1, -1), flat, torch.full_like(flat, float("nan")))
    face = masked.nanmedian(dim=2).values
    face = torch.where(torch.isnan(face), r.face.expand(t, 3), face)  # [T, 3]
    direction = face - dark[None]  # [T, 3]
    norm2 = (direction**2).sum(1).clamp_min(FOREGROUND**2)
    paint = ((face[:, :, None, None] - frames) * direction[:, :, None, None]).sum(1) / norm2[:, None, None]
    ys, _ = _grid(h, w)
    below = (ys[None] - (center[:, 0, None, None] + MOUTH_TOP * ry) + 0.5).clamp(0.0, 1.0)  # [T, H, 1]
    amount = (paint.clamp(0.0, 2.0) * inside * below).sum((1, 2))
    return (amount / r.area.clamp_min(1.0)).double().numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant or not finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def lip_sync(video, reference, wav, sample_rate: int = SAMPLE_RATE, fps: float = FPS) -> float:
    """Pearson r between :func:`mouth_opening` and :func:`~liveavatar.data.toy.audio_envelope` of ``wav`` over
    the video's ``T`` frames, in ``[-1, 1]`` (0.0 when either is constant)."""
    opening = mouth_opening(video, reference)
    return _pearson(opening, audio_envelope(np.asarray(wav), len(opening), sample_rate, fps))


# Weights of the identity error's terms: background colour, face colour (mean abs over rgb, [-1, 1] units),
# relative face-area difference. Equal: a colour off by 0.1 costs as much as a face 10% too large or small.
IDENTITY_WEIGHTS = (1.0, 1.0, 1.0)


def identity_error(video, reference) -> np.ndarray:
    """Per-frame identity error ``float64 [T]`` against the reference: ``w_bg * mean|bg - bg_ref| + w_face *
    mean|face - face_ref| + w_area * |area - area_ref| / area_ref`` with :data:`IDENTITY_WEIGHTS`, each frame
    read back like :func:`estimate_identity`. 0 for the reference itself; small (mouth and blinks change the
    area slightly) for a true render of the same identity."""
    frames, ref = _pair(video, reference)
    s, r = _read(frames), _read(ref)
    w_bg, w_face, w_area = IDENTITY_WEIGHTS
    err = (
        w_bg * (s.background - r.background).abs().mean(1)
        + w_face * (s.face - r.face).abs().mean(1)
        + w_area * (s.area - r.area).abs() / r.area.clamp_min(1.0)
    )
    return err.double().numpy()


def flicker(video) -> float:
    """Mean absolute frame-to-frame change over all pixels and channels, ``[-1, 1]`` units (0.0 for fewer than
    two frames). The toy world itself changes little from frame to frame (slow head drift, the mouth, blinks),
    so anything above a true clip's level is temporal instability."""
    frames = _frames(video)
    if frames.shape[0] < 2:
        return 0.0
    return float((frames[1:] - frames[:-1]).abs().mean())


def drift(errors: np.ndarray, window: int) -> float:
    """Drift of a per-frame error over time: mean of the last ``window`` values minus mean of the first
    ``window`` (``window`` clipped to half the length; 0.0 for fewer than two values)."""
    errors = np.nan_to_num(np.asarray(errors, dtype=np.float64).ravel(), nan=0.0, posinf=1e6, neginf=-1e6)
    window = min(max(1, int(window)), len(errors) // 2)
    if window < 1:
        return 0.0
    return float(errors[-window:].mean() - errors[:window].mean())


class _Scores:
    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class ToyScores(_Scores):
    """GenBench-toy scores of one video: ``lip_sync`` (Pearson r, higher is better), ``identity_error`` (mean
    per-frame error, lower is better), ``identity_drift`` (last quarter minus first quarter of the per-frame
    error; positive = the identity degrades over time), ``flicker`` (mean abs frame difference)."""

    lip_sync: float
    identity_error: float
    identity_drift: float
    flicker: float


def score_video(
    video, reference, wav, sample_rate: int = SAMPLE_RATE, fps: float = FPS, drift_window: int | None = None
) -> ToyScores:
    """All toy scores of ``video [3, T, H, W]`` against ``reference [3, H, W]`` and its driving audio ``wav``.
    ``drift_window`` defaults to a quarter of the frames."""
    errors = identity_error(video, reference)
    return ToyScores(
        lip_sync=lip_sync(video, reference, wav, sample_rate, fps),
        identity_error=float(errors.mean()) if len(errors) else 0.0,
        identity_drift=drift(errors, drift_window or max(1, len(errors) // 4)),
        flicker=flicker(video),
    )


def head_height(video, reference) -> np.ndarray:
    """Vertical position of the face ``float64 [T]`` in image units (the silhouette's centre; larger: lower)."""
    frames, _ = _pair(video, reference)
    return (_read(frames).center[:, 0] / frames.shape[-2]).double().numpy()


@dataclass
class InteractionScores(_Scores):
    """Talking and listening on the toy world (StreamAvatar's listening-motion analysis, on the toy's head):
    ``listening_motion`` / ``speaking_motion``: variance of the head's height (image units squared, x 1e4) over the
    listening / speaking frames (the toy listener nods with the other voice, so a model that listens moves its head
    then); ``nod_sync``: Pearson r between the head's height and the other voice's smoothed loudness over the
    listening frames; ``lip_sync_speaking``: lip sync over the speaking frames only; ``mouth_listening``: mean
    mouth opening while listening (a listener's mouth stays closed)."""

    listening_motion: float
    speaking_motion: float
    nod_sync: float
    lip_sync_speaking: float
    mouth_listening: float


def interaction_scores(video, reference, wav, listen_wav, speaking, sample_rate: int = SAMPLE_RATE,
                       fps: float = FPS) -> InteractionScores:
    """:class:`InteractionScores` of ``video [3, T, H, W]`` for a conversation: the avatar's own voice ``wav``, the
    other's ``listen_wav`` and the speaking mask ``speaking [T]`` (True: the avatar holds the turn)."""
    from liveavatar.data.toy import listening_nod

    height = head_height(video, reference)
    t = len(height)
    speaking = np.asarray(speaking, dtype=bool)[:t]
    listening = ~speaking

    def variance(mask):
        return float(height[mask].var() * 1e4) if mask.sum() > 1 else 0.0

    other = audio_envelope(np.asarray(listen_wav), t, sample_rate, fps)
    nod = listening_nod(other, speaking, fps)
    opening = mouth_opening(video, reference)
    own = audio_envelope(np.asarray(wav), t, sample_rate, fps)
    return InteractionScores(
        listening_motion=variance(listening), speaking_motion=variance(speaking),
        nod_sync=_pearson(height[listening], nod[listening]) if listening.sum() > 1 else 0.0,
        lip_sync_speaking=_pearson(opening[speaking], own[speaking]) if speaking.sum() > 1 else 0.0,
        mouth_listening=float(opening[listening].mean()) if listening.any() else 0.0,
    )
