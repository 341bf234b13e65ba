"""Generate the example inputs in ``data/example/`` procedurally (no downloads, deterministic).

* ``reference.png``: a 256x256 cartoon face (background, hair, shoulders, face, ears, eyes, brows, nose,
  mouth, blush), drawn with numpy at 4x resolution and box-downsampled for antialiased edges.
* ``speech.wav``: ~4 s of speech-like audio, 16 kHz mono 16-bit: voiced syllables (pitch 120-200 Hz with
  vibrato and drift, harmonics shaped by three formant resonances that glide between vowels), short noise
  bursts as consonants, amplitude envelopes, and pauses between syllables and phrases.

These are smoke-test inputs for the pipeline, not realistic data: they exercise shapes, lengths and I/O.

    python scripts/make_example_assets.py [--out data/example] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from liveavatar.media import write_image, write_wav

SAMPLE_RATE = 16000
SS = 4  # supersampling factor for the drawing


# ---------------------------------------------------------------------------------------------- the face


def _ellipse(yy, xx, cy, cx, ry, rx):
    """Boolean mask of an axis-aligned ellipse; coordinates in [0, 1] image units."""
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def draw_face(size: int = 256) -> np.ndarray:
    """Cartoon face -> float32 ``[size, size, 3]`` in [0, 1]."""
    n = size * SS
    yy, xx = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
    img = np.empty((n, n, 3), np.float32)
    img[:] = (0.55, 0.72, 0.86)  # sky-blue background

    def paint(mask, rgb):
        img[mask] = rgb

    skin, skin_dark = (0.96, 0.80, 0.66), (0.86, 0.66, 0.52)
    hair = (0.30, 0.18, 0.10)
    paint(_ellipse(yy, xx, 1.05, 0.5, 0.22, 0.42), (0.25, 0.45, 0.38))  # shoulders / shirt
    paint((np.abs(xx - 0.5) < 0.085) & (yy > 0.70) & (yy < 0.86), skin_dark)  # neck
    paint(_ellipse(yy, xx, 0.40, 0.5, 0.33, 0.30), hair)  # hair behind the head
    paint(_ellipse(yy, xx, 0.50, 0.235, 0.07, 0.045), skin_dark)  # ears
    paint(_ellipse(yy, xx, 0.50, 0.765, 0.07, 0.045), skin_dark)
    face = _ellipse(yy, xx, 0.50, 0.5, 0.29, 0.25)
    paint(face, skin)
    paint(face & _ellipse(yy, xx, 0.20, 0.5, 0.17, 0.30), hair)  # fringe
    for side in (-1, 1):
        ex = 0.5 + side * 0.10
        paint(_ellipse(yy, xx, 0.47, ex, 0.038, 0.058), (1.0, 1.0, 1.0))  # eye white
        paint(_ellipse(yy, xx, 0.47, ex, 0.030, 0.030), (0.25, 0.45, 0.70))  # iris
        paint(_ellipse(yy, xx, 0.47, ex, 0.016, 0.016), (0.05, 0.05, 0.08))  # pupil
        paint(_ellipse(yy, xx, 0.462, ex + 0.009, 0.007, 0.007), (1.0, 1.0, 1.0))  # highlight
        paint(_ellipse(yy, xx, 0.39, ex, 0.011, 0.06), hair)  # eyebrow
        paint(_ellipse(yy, xx, 0.60, 0.5 + side * 0.17, 0.035, 0.05), (0.97, 0.68, 0.62))  # blush
    paint(_ellipse(yy, xx, 0.575, 0.5, 0.022, 0.026), skin_dark)  # nose
    lips = _ellipse(yy, xx, 0.665, 0.5, 0.035, 0.085)
    paint(lips, (0.80, 0.30, 0.32))
    paint(lips & _ellipse(yy, xx, 0.665, 0.5, 0.008, 0.075), (0.35, 0.08, 0.10))  # mouth line
    return img.reshape(size, SS, size, SS, 3).mean(axis=(1, 3))  # box filter = antialiasing


# ---------------------------------------------------------------------------------------------- speech

# (F1, F2, F3) in Hz of a few vowels (adult male averages, Peterson & Barney style).
VOWELS = {
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (270, 2290, 3010),
    "o": (570, 840, 2410),
    "u": (300, 870, 2240),
}
BANDWIDTHS = np.array([80.0, 100.0, 140.0])


def _resonance(f, fc, bw):
    """Magnitude of a second-order resonance at ``fc`` with bandwidth ``bw``, 1 at DC (a formant filter)."""
    return fc**2 / np.sqrt((fc**2 - f**2) ** 2 + (bw * f) ** 2)


def synth_speech(seconds: float = 4.0, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like mono float32 ``[samples]`` (peak 0.7), built syllable by syllable."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    # Per-sample control tracks: pitch, formants, voiced amplitude; a pause leaves amplitude at 0.
    f0 = np.zeros(n)
    formants = np.zeros((n, 3))
    amp = np.zeros(n)
    noise = np.zeros(n)
    t = int(0.15 * sample_rate)
    prev = np.array(VOWELS["a"], float)
    syllable = 0
    while True:
        dur = int(rng.uniform(0.16, 0.34) * sample_rate)
        if t + dur > n - int(0.1 * sample_rate):
            break
        target = np.array(VOWELS[rng.choice(list(VOWELS))], float) * rng.uniform(0.95, 1.05)
        idx = np.arange(dur)
        # Formants glide from the previous vowel over the first ~60 ms (coarticulation).
        glide = np.clip(idx / (0.06 * sample_rate), 0, 1)[:, None]
        formants[t : t + dur] = prev + (target - prev) * glide
        # Pitch: phrase declination from ~185 to ~125 Hz, a per-syllable accent, falling within the syllable.
        base = 185 - 60 * t / n + rng.uniform(-10, 15)
        f0[t : t + dur] = base * (1 + 0.06 * (1 - idx / dur))
        # Envelope: 25 ms attack, slow decay, 40 ms release (raised cosines).
        att, rel = int(0.025 * sample_rate), int(0.04 * sample_rate)
        env = np.ones(dur) * np.linspace(1.0, 0.75, dur)
        env[:att] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(att) / att)
        env[-rel:] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(rel) / rel)
        amp[t : t + dur] = env * rng.uniform(0.7, 1.0)
        # Most syllables start with a consonant: a 20-50 ms noise burst just before the vowel.
        if rng.random() < 0.7 and t > 0:
            b = int(rng.uniform(0.02, 0.05) * sample_rate)
            noise[max(0, t - b) : t] = rng.uniform(0.15, 0.35) * np.hanning(min(b, t))
        prev = target
        syllable += 1
        pause = rng.uniform(0.04, 0.12) if syllable % 4 else rng.uniform(0.25, 0.4)  # phrase breaks
        t += dur + int(pause * sample_rate)
    # Fill pitch in pauses (held), so the oscillator phase stays continuous, then add 5.5 Hz vibrato and a
    # slow random drift (a normalised random walk, at most a few percent).
    held = np.maximum.accumulate(np.where(f0 > 0, np.arange(n), 0))
    f0 = np.where(f0 > 0, f0, f0[held])
    f0[f0 == 0] = 160.0
    times = np.arange(n) / sample_rate
    f0 *= 1 + 0.015 * np.sin(2 * np.pi * 5.5 * times) + 0.03 * rng.standard_normal(n).cumsum() / np.sqrt(n)
    formants[amp == 0] = formants[held][amp == 0]
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = np.zeros(n)
    for k in range(1, int(4000 / 110) + 1):
        fk = k * f0
        gain = np.ones(n)
        for i in range(3):
            gain = gain * _resonance(fk, formants[:, i], BANDWIDTHS[i]) ** (1 / 1.5)
        gain *= (fk < sample_rate / 2 - 500) / k  # -6 dB/octave source tilt, no aliasing
        voiced += gain * np.sin(k * phase)
    voiced *= amp / (np.abs(voiced * (amp > 0)).max() + 1e-9)
    # Consonant noise: white noise through a crude high-pass (first difference).
    hiss = np.diff(rng.standard_normal(n + 1)) * 0.5 * noise
    wav = voiced + hiss
    return (0.7 * wav / np.abs(wav).max()).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="reference image side in pixels")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    face = torch.from_numpy(draw_face(args.size)).permute(2, 0, 1) * 2 - 1
    png = write_image(args.out / "reference.png", face)
    wav = write_wav(args.out / "speech.wav", synth_speech(args.seconds, SAMPLE_RATE, args.seed), SAMPLE_RATE)
    for p in (png, wav):
        print(f"{p}  {p.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
