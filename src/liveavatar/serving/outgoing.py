"""What waits to be sent to one client, bounded: a client that cannot take the video as fast as it is made loses
whole old fragments (counted) instead of letting the server's memory and the client's delay grow.

The fragments of a stream are H.264 frames that refer to earlier ones back to the last keyframe, so a fragment can
only be left out together with every later one up to the next fragment that starts with a keyframe; when none is
waiting, every fragment that comes until one does is left out. Keyframes are made on request only (a fast client
pays nothing for this): once half the allowed video waits, the session is asked to start its next block with one, so
that an overflow then drops the oldest fragments up to it and keeps the newer ones. What is sent is therefore
always a decodable stream: the init segment, then runs of consecutive fragments each starting with a keyframe. Each fragment keeps its own decode time (``tfdt``), so a run after a gap
plays at its place in the timeline (the page jumps over the gap). Other messages (JSON, the init segment) are never
dropped.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Fragment:
    """One block's media for the client: ``data`` (an MP4 ``moof`` + ``mdat``), its ``frames`` of video lasting
    ``seconds``, whether its first video frame is a ``keyframe``, and ``message``: the block's JSON, sent right after
    the fragment (and dropped with it)."""

    data: bytes
    frames: int
    seconds: float
    keyframe: bool
    message: dict


class Outgoing:
    """A client's outgoing messages (``bytes``, dicts, :class:`Fragment` s), at most ``max_seconds`` of video
    waiting. Used from the event loop only: :meth:`put` never blocks, :meth:`get` waits.

    Args:
        max_seconds: the most video that may wait; past it old fragments are dropped, whole.
        want_keyframe: called when the fragments that come next are dropped until one starts with a keyframe
            (the session should make its next block start with one).
    """

    def __init__(self, max_seconds: float, want_keyframe: Callable[[], None] = lambda: None):
        if not max_seconds > 0:
            raise ValueError(f"server.max_outgoing_s={max_seconds}: must be > 0")
        self.max_seconds, self.want_keyframe = float(max_seconds), want_keyframe
        self._items: deque = deque()
        self._seconds = 0.0          # video waiting
        self._need_keyframe = False  # fragments are dropped until one starts with a keyframe
        self._asked = False          # a keyframe was asked for and has not come yet
        self._ready = asyncio.Event()
        self.dropped_blocks = 0
        self.dropped_frames = 0

    @property
    def seconds(self) -> float:
        """Seconds of video waiting."""
        return self._seconds

    def put(self, message: Any) -> None:
        if isinstance(message, Fragment):
            if self._need_keyframe and not message.keyframe:
                self._count(message)
                return
            if message.keyframe:
                self._need_keyframe = self._asked = False
            self._seconds += message.seconds
            self._items.append(message)
            self._trim()
            # Falling behind: have a keyframe wait behind the oldest fragment before the limit is reached.
            fragments = [m for m in self._items if isinstance(m, Fragment)]
            if self._seconds > self.max_seconds / 2 and not any(m.keyframe for m in fragments[1:]):
                self._ask()
        else:
            self._items.append(message)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        message = self._items.popleft()
        if isinstance(message, Fragment):
            self._seconds -= message.seconds
        return message

    def _trim(self) -> None:
        """Drop the oldest fragments, each with those that decode from it, until the video waiting fits."""
        # The newest fragment always stays (a limit below one block would otherwise drop every block).
        while self._seconds > self.max_seconds and sum(isinstance(m, Fragment) for m in self._items) > 1:
            kept: deque = deque()
            dropping, first = True, True  # the oldest fragment, and after it those up to the next keyframe
            for message in self._items:
                if dropping and isinstance(message, Fragment) and (first or not message.keyframe):
                    first = False
                    self._seconds -= message.seconds
                    self._count(message)
                    continue
                if isinstance(message, Fragment):
                    dropping = False
                kept.append(message)
            self._items = kept
            if dropping:  # no keyframe waits: what comes is dropped until one does
                self._need_keyframe = True
                self._ask()
                return

    def _ask(self) -> None:
        if not self._asked:
            self._asked = True
            self.want_keyframe()

    def _count(self, fragment: Fragment) -> None:
        self.dropped_blocks += 1
        self.dropped_frames += fragment.frames
