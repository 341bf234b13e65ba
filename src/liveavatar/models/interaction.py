"""Talking and listening (StreamAvatar): who holds the turn in each video frame, and the two masked audio streams a
listening model (``model.dit.listening``) takes.

The speaking mask is one value per video frame: 1 while the avatar speaks, 0 while it listens. As in StreamAvatar
it multiplies the audio *features* after extraction, never the waveform (a cut waveform would give the audio
encoder inputs unlike its training data): the talking stream is the avatar's own voice times the mask, the
listening stream the interlocutor's voice times one minus the mask. The two are stacked on the features' layer
axis, talking first, so everything that carries audio features (block splitting, engines, TPP) carries both.

Where the mask comes from (``audio_mask=`` in ``infer.py``):
- labels: a ``.npy`` or ``.txt`` file of one 0/1 per video frame, or a ``.json`` list of ``[start_s, end_s]``
  speaking intervals (StreamAvatar labels its data with TalkNet, an audio-visual speaker detector; such labels are
  what training data should carry);
- otherwise, with two separate streams (``listen_audio=``), a voice-activity decision per frame from their
  energies (:func:`speaking_from_voices`): the avatar speaks where its own voice is active and at least as loud as
  the other voice. Energy is used rather than a learned detector because no detector weights can be fetched here
  and separate streams (a call's two channels) make it reliable; for one mixed recording it cannot tell who
  speaks, so a mixed recording without labels is taken as all speaking;
- otherwise all ones (talking only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

ACTIVE_DB = -35.0     # a frame is voiced when its energy is within this many dB of the stream's loudest frame
HANGOVER_S = 0.2      # pauses shorter than this inside a turn do not end it


def talk_listen_features(talk: torch.Tensor, listen: torch.Tensor, speaking: torch.Tensor) -> torch.Tensor:
    """Features of the avatar's voice ``talk`` and the interlocutor's ``listen`` (``[B, V, layers, feat]`` each) and
    the speaking mask ``[V]`` or ``[B, V]`` -> ``[B, V, 2 * layers, feat]``: ``talk * mask``, then
    ``listen * (1 - mask)``."""
    if talk.shape != listen.shape:
        raise ValueError(f"talking and listening features differ in shape: {tuple(talk.shape)} vs {tuple(listen.shape)}")
    if speaking.shape[-1] != talk.shape[1]:
        raise ValueError(f"a speaking mask of {speaking.shape[-1]} frames for features of {talk.shape[1]} frames")
    mask = speaking.to(talk.dtype).reshape(-1, talk.shape[1], 1, 1).to(talk.device)
    return torch.cat([talk * mask, listen * (1 - mask)], dim=2)


def frame_rms(wav: np.ndarray, frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """RMS of each video frame's audio ``[frames]`` (0 past the end of ``wav``)."""
    bounds = np.round(np.arange(frames + 1) * sample_rate / fps).astype(int)
    return np.array([np.sqrt(np.mean(np.square(wav[a:b], dtype=np.float64))) if b > a and a < len(wav) else 0.0
                     for a, b in zip(bounds[:-1], bounds[1:])])


def relative_db(rms: np.ndarray) -> np.ndarray:
    """Per-frame level in dB relative to the loudest frame (-inf for silence)."""
    peak = rms.max(initial=0.0)
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms / peak) if peak > 0 else np.full(rms.shape, -np.inf)


def _close_gaps(active: np.ndarray, longest: int) -> np.ndarray:
    """Fill runs of False no longer than ``longest`` that lie between True frames."""
    out, idx = active.copy(), np.flatnonzero(active)
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= longest + 1:
            out[a:b] = True
    return out


def speaking_from_voices(own: np.ndarray, other: np.ndarray, frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """The speaking mask ``[frames]`` (bool) from two separate voices: the avatar's own voice is active (within
    :data:`ACTIVE_DB` of its loudest frame, short pauses bridged) and at least as loud as the other voice."""
    hangover = max(0, round(HANGOVER_S * fps))
    own_rms, other_rms = frame_rms(own, frames, fps, sample_rate), frame_rms(other, frames, fps, sample_rate)
    own_active = _close_gaps(relative_db(own_rms) > ACTIVE_DB, hangover)
    other_active = _close_gaps(relative_db(other_rms) > ACTIVE_DB, hangover)
    return own_active & (~other_active | (own_rms >= other_rms))


def read_speaking_labels(path: str | os.PathLike, frames: int, fps: float) -> np.ndarray:
    """Speaking labels from a file -> bool ``[frames]``: ``.npy``/``.txt`` with one 0/1 per video frame (at least
    ``frames`` of them), or ``.json`` with a list of ``[start_s, end_s]`` speaking intervals. Raises ``ValueError``
    (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio_mask={path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            intervals = json.loads(path.read_text())
            times = (np.arange(frames) + 0.5) / fps
            mask = np.zeros(frames, dtype=bool)
            for start, end in intervals:
                mask |= (times >= float(start)) & (times < float(end))
            return mask
        values = np.load(path) if suffix == ".npy" else np.loadtxt(path, ndmin=1)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"audio_mask={path}: unreadable ({err})") from None
    values = np.asarray(values).reshape(-1)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"audio_mask={path}: labels must be 0 (listening) or 1 (speaking)")
    if len(values) < frames:
        raise ValueError(f"audio_mask={path}: {len(values)} labels for {frames} video frames")
    return values[:frames].astype(bool)
