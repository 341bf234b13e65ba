"""A client's live audio as the engine takes it: one block at a time, paced in real time.

The socket's reader :meth:`LiveAudio.put` s samples as they arrive; the model's thread :meth:`LiveAudio.take` s
exactly one block's worth. Two rules keep the stream live:

* **never freeze**: a block whose audio has not arrived ``grace_s`` after it was due (by a clock that advances
  one block duration per block taken, from the first take) is silence instead, so the avatar keeps moving (idle
  motion from silent audio) while the client sends nothing; the client's late audio is used for later blocks;
* **bounded latency**: when more than ``max_lag_s`` of audio waits (the engine is slower than real time), the
  oldest whole blocks are dropped and counted, so the delay stops growing.

Both are counted (``silent_blocks``, ``dropped_blocks`` / ``dropped_samples``) for the client to see.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np


class SessionCancelled(Exception):
    """The session ended (the client left or asked to stop) while the engine waited for its audio."""


@dataclass
class AudioBlock:
    """One block's audio as the engine gets it: ``samples`` ``[n]`` float32, and the index of its first sample in
    the client's stream (None: silence put in while the client sent nothing)."""

    samples: np.ndarray
    client_start: int | None


class LiveAudio:
    """Thread-safe live audio buffer (mono float32 at ``sample_rate``).

    Args:
        sample_rate: of the samples put and taken.
        max_lag_s: the most audio that may wait; past it the oldest whole blocks are dropped.
        grace_s: how late a block's audio may be (network and capture jitter) before silence replaces it.
        clock: seconds, monotonic (a test may pass its own).
    """

    def __init__(self, sample_rate: int, max_lag_s: float = 0.5, grace_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic):
        if not max_lag_s > 0 or not grace_s >= 0:
            raise ValueError(f"max_lag_s={max_lag_s} must be > 0 and grace_s={grace_s} >= 0")
        self.sample_rate, self.max_lag_s, self.grace_s, self._clock = int(sample_rate), max_lag_s, grace_s, clock
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0         # samples waiting
        self._received = 0         # samples put, in all
        self._consumed = 0         # client samples taken or dropped
        self._due: float | None = None   # when the next block's audio should be complete
        self._cancelled = False
        self._cond = threading.Condition()
        self.dropped_blocks = self.dropped_samples = self.silent_blocks = 0

    # ------------------------------------------------------------------------------------------ producer side

    def put(self, samples: np.ndarray) -> None:
        """Append the client's next samples ``[n]``."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not samples.size:
            return
        with self._cond:
            self._chunks.append(samples)
            self._buffered += samples.size
            self._received += samples.size
            self._cond.notify_all()

    def cancel(self) -> None:
        """End the session: a waiting or later :meth:`take` raises :class:`SessionCancelled`."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def backlog_s(self) -> float:
        """Seconds of the client's audio received and not yet taken."""
        return self._buffered / self.sample_rate

    @property
    def received(self) -> int:
        return self._received

    # ------------------------------------------------------------------------------------------ engine side

    def take(self, n: int) -> AudioBlock:
        """The next block of ``n`` samples: the client's, or silence if they are ``grace_s`` late. Blocks until
        then; raises :class:`SessionCancelled` once the session is cancelled."""
        block_s = n / self.sample_rate
        with self._cond:
            if self._due is None:  # the clock starts when the engine first asks
                self._due = self._clock() + block_s
            deadline = self._due + self.grace_s
            while self._buffered < n and not self._cancelled:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._cancelled:
                raise SessionCancelled()
            # Whole blocks past the allowed lag go, oldest first.
            while self._buffered - n > self.max_lag_s * self.sample_rate and self._buffered >= 2 * n:
                self._pop(n)
                self.dropped_blocks += 1
                self.dropped_samples += n
                self._consumed += n
                self._due += block_s
            self._due += block_s
            if self._buffered < n:
                self.silent_blocks += 1
                return AudioBlock(np.zeros(n, dtype=np.float32), None)
            start = self._consumed
            self._consumed += n
            return AudioBlock(self._pop(n), start)

    def _pop(self, n: int) -> np.ndarray:
        """The oldest ``n`` buffered samples (there are at least ``n``)."""
        parts, need = [], n
        while need:
            head = self._chunks[0]
            if head.size <= need:
                parts.append(self._chunks.popleft())
                need -= head.size
            else:
                parts.append(head[:need])
                self._chunks[0] = head[need:]
                need = 0
        self._buffered -= n
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
