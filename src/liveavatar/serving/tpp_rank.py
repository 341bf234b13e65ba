"""One rank of the TPP group behind ``serve.py engine=tpp``: ``python -m liveavatar.serving.tpp_rank``, started by
:class:`~.tpp_group.TPPGroup` with its settings on stdin and the torch.distributed environment torchrun would set.

The rank joins the group (the server hosts its rendezvous store), loads its part
(:class:`~liveavatar.tpp_pipeline.TPPPipeline`), says it is ready and runs the sessions the server starts, one after
another, each from a fresh cache: rank 0 takes each block's audio from the server and computes its causal features
(as the one-process pipeline does), the output rank sends each decoded block back. Between sessions no collective
is pending, so a server idle for hours trips no process-group timeout. A thread reads the server's messages, so an
``abort`` reaches a rank in the middle of a forward: the rest of that session passes without compute.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from multiprocessing.connection import Client, Connection
from typing import Iterator

import torch
from omegaconf import OmegaConf

from .. import media
from ..components import UserError
from ..engine.tpp import PeerFailure, RankFailure, describe_failure
from ..pipeline import live_feature_blocks
from ..tpp_pipeline import TPPPipeline


class _Aborted(Exception):
    """The server gave the session up while rank 0 waited for its audio."""


class Inbox:
    """The server's messages to this rank, read by a thread: sessions to start (:attr:`sessions`, None at the
    end), rank 0's audio (:meth:`audio_for`), and the last session given up (:attr:`aborted`)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._lock = threading.Lock()
        self.sessions: queue.Queue = queue.Queue()
        self._audio: queue.Queue = queue.Queue()
        self.aborted = -1
        threading.Thread(target=self._listen, daemon=True, name="liveavatar-tpp-inbox").start()

    def send(self, message: tuple) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                os._exit(3)  # the server is gone

    def _listen(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(3)  # the server is gone (killed): so is this rank, with nothing left to serve
            kind = message[0]
            if kind == "session":
                self.sessions.put(message[1:])
            elif kind in ("audio", "end"):
                self._audio.put(message)
            elif kind == "abort":
                self.aborted = max(self.aborted, message[1])
                self._audio.put(message)
            elif kind == "shutdown":  # a session still running is given up first
                self.aborted = sys.maxsize
                self._audio.put(("abort", None))
                self.sessions.put(None)
                return

    def audio_for(self, session: int) -> Iterator:
        """Rank 0: session ``session``'s audio chunks ``[n]`` float32, until its end; raises :class:`_Aborted`
        when the session is given up. Messages of earlier sessions are skipped."""
        while True:
            kind, sid, *payload = self._audio.get()
            if sid != session and sid is not None:  # (None: every session)
                continue
            if kind == "end":
                return
            if kind == "abort":
                raise _Aborted
            yield payload[0]


def live_features(pipe: TPPPipeline, inbox: Inbox, session: int) -> Iterator:
    """Rank 0's per-block features of one session, causal, from the audio the server sends."""
    blocks, _ = live_feature_blocks(pipe.audio_encoder, inbox.audio_for(session), pipe.fps, pipe.dit,
                                    pipe.audio_options)
    try:
        yield from blocks
    except _Aborted:  # given up: no flush of a last partial block, nothing more to compute
        return


def serve(pipe: TPPPipeline, inbox: Inbox) -> None:
    """Run the server's sessions until it shuts the group down."""
    while (session := inbox.sessions.get()) is not None:
        sid, pixels = session
        features = live_features(pipe, inbox, sid) if pipe.rank == 0 else None
        blocks = pipe.stream_live(torch.from_numpy(pixels), features, skip=lambda sid=sid: inbox.aborted >= sid)
        if blocks is None:
            continue
        for block, cost in blocks:
            inbox.send(("block", sid, block.index, media.to_uint8(block.frames).numpy(), cost))
        inbox.send(("ended", sid))  # after the group met again: every rank is done with the session


def main() -> int:
    spec = json.loads(sys.stdin.read())
    rank = int(os.environ["RANK"])
    inbox = Inbox(Client(spec["address"], family="AF_UNIX", authkey=bytes.fromhex(spec["authkey"])))
    inbox.send(("hello", rank))
    pipe = None
    try:
        pipe = TPPPipeline(OmegaConf.create(spec["config"]))
        pipe.prepare_live()
        inbox.send(("ready", rank))
        serve(pipe, inbox)
        return 0
    except UserError as err:  # the same on every rank: the server says it once
        inbox.send(("error", rank, str(err), True, None))
        return 2
    except (PeerFailure, KeyboardInterrupt):  # another rank failed and has said so
        return 3
    except RankFailure as err:  # this rank's own failure, already named
        inbox.send(("error", rank, str(err), False, "".join(traceback.format_exception(err.__cause__))))
        return 3
    except BaseException as err:  # noqa: BLE001 - the server names the rank and the error, and shows the traceback
        # of the failure that stopped the group (not that of a rank that failed because a peer had died).
        inbox.send(("error", rank, describe_failure(rank, err), False, traceback.format_exc()))
        return 3
    finally:
        if pipe is not None:
            pipe.close()


if __name__ == "__main__":
    sys.exit(main())
