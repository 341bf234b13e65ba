"""MFCCs as SyncNet was trained on them: the defaults of ``python_speech_features.mfcc`` (16 kHz, 25 ms frames every
10 ms with a rectangular window, 0.97 pre-emphasis, a 512-point power spectrum, 26 mel filters from 0 Hz to
Nyquist, log, orthonormal DCT-II keeping 13 coefficients, sinusoidal liftering with L = 22, and the first
coefficient replaced by the log frame energy), written here with numpy. Audio is float in [-1, 1]; it is scaled to
the 16-bit integer range those MFCCs were computed on (the scale shifts the log energies)."""
from __future__ import annotations

import numpy as np

from ..media import SAMPLE_RATE

WINDOW_S, HOP_S, NFFT, FILTERS, COEFFS, LIFTER, PREEMPH = 0.025, 0.01, 512, 26, 13, 22, 0.97
INT16 = 32768.0


def _mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, filters: int = FILTERS, nfft: int = NFFT) -> np.ndarray:
    """``[filters, nfft // 2 + 1]`` triangular filters on FFT bins spaced evenly in mel from 0 to Nyquist."""
    points = _hz(np.linspace(_mel(0.0), _mel(sample_rate / 2), filters + 2))
    bins = np.floor((nfft + 1) * points / sample_rate).astype(int)
    bank = np.zeros((filters, nfft // 2 + 1))
    for j in range(filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        bank[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        bank[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    return bank


def _frames(signal: np.ndarray, length: int, step: int) -> np.ndarray:
    """Overlapping frames ``[n, length]``; the last one zero-padded."""
    n = 1 if len(signal) <= length else 1 + int(np.ceil((len(signal) - length) / step))
    padded = np.concatenate([signal, np.zeros(max(0, (n - 1) * step + length - len(signal)))])
    index = np.arange(length)[None, :] + step * np.arange(n)[:, None]
    return padded[index]


def mfcc(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``[frames, 13]``: one row every 10 ms (4 per video frame at 25 fps)."""
    x = np.asarray(wav, dtype=np.float64) * INT16
    x = np.append(x[0], x[1:] - PREEMPH * x[:-1])
    frames = _frames(x, int(round(WINDOW_S * sample_rate)), int(round(HOP_S * sample_rate)))
    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2 / NFFT
    eps = np.finfo(float).eps
    energy = np.where(power.sum(1) == 0, eps, power.sum(1))
    feats = power @ mel_filterbank(sample_rate).T
    feats = np.log(np.where(feats == 0, eps, feats))
    n = np.arange(FILTERS)
    dct = np.sqrt(2.0 / FILTERS) * np.cos(np.pi * (n[None, :] + 0.5) * np.arange(COEFFS)[:, None] / FILTERS)
    dct[0] /= np.sqrt(2.0)
    cepstra = feats @ dct.T
    cepstra *= 1 + (LIFTER / 2.0) * np.sin(np.pi * np.arange(COEFFS) / LIFTER)
    cepstra[:, 0] = np.log(energy)
    return cepstra
