"""One loaded model, one session at a time: the others wait in line (first come, first served) and are told their
place whenever it changes; past ``max_queue`` waiting, a newcomer is refused. Runs on the event loop (asyncio)."""
from __future__ import annotations

import asyncio
from typing import Callable


class QueueFull(Exception):
    """More sessions wait than ``max_queue`` allows; the message is one line for the client."""


class Ticket:
    """A client's place: ``on_position(position, waiting)`` is called with its place in line (1: next) and the
    line's length each time they change while it waits."""

    def __init__(self, on_position: Callable[[int, int], None] = lambda position, waiting: None):
        self.on_position = on_position
        self._turn = asyncio.Event()


class Scheduler:
    """Hands the model to one :class:`Ticket` at a time.

    Args:
        max_queue: how many may wait while one is served (0: none; a newcomer is refused while one is served).
    """

    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"server.max_queue={max_queue}: must be >= 0")
        self.max_queue = int(max_queue)
        self.active: Ticket | None = None
        self._line: list[Ticket] = []
        self.served = 0  # sessions that got the model

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for ``ticket``'s turn. Raises :class:`QueueFull` at once if the line is full. If the waiting task
        is cancelled (the client left), the ticket leaves the line."""
        if self.active is None and not self._line:
            self._grant(ticket)
            return
        if len(self._line) >= self.max_queue:
            raise QueueFull(f"the server is busy: {len(self._line)} session(s) already wait for the model "
                            f"(server.max_queue={self.max_queue}); try again later")
        self._line.append(ticket)
        self._announce()
        try:
            await ticket._turn.wait()
        except asyncio.CancelledError:
            self.release(ticket)
            raise

    def release(self, ticket: Ticket) -> None:
        """``ticket`` is done (served or gone): the next in line gets the model. Safe to call more than once."""
        if ticket in self._line:
            self._line.remove(ticket)
            self._announce()
        elif self.active is ticket:
            self.active = None
            if self._line:
                self._grant(self._line.pop(0))
                self._announce()

    def _grant(self, ticket: Ticket) -> None:
        self.active = ticket
        self.served += 1
        ticket._turn.set()

    def _announce(self) -> None:
        for position, ticket in enumerate(self._line, start=1):
            ticket.on_position(position, len(self._line))
