"""The FastAPI app: the page (``/``, ``/static/*``), the reference images (``/api/images``), the server's state
(``/api/status``) and the live socket (``/ws``, :mod:`.protocol`), over one loaded pipeline.

Threads: the event loop does the sockets; the model runs on one thread of its own (sessions take turns through the
:class:`~.scheduler.Scheduler`), so a block's compute never stalls another client's queue updates. Messages from the
model's thread reach a socket through its outgoing queue (``loop.call_soon_threadsafe``), bounded in seconds of
video (:class:`~.outgoing.Outgoing`): a client too slow to take the stream loses whole old fragments, counted.
"""
from __future__ import annotations

import asyncio
import contextlib
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from ..pipeline import LiveAvatarPipeline
from .outgoing import Fragment, Outgoing
from .protocol import ProtocolError, gallery, parse_json, pcm16_to_float, start_image
from .scheduler import QueueFull, Scheduler, Ticket
from .session import Session, SessionOptions

PAGE = Path(__file__).resolve().parent / "page"
_CLOSE_NORMAL, _CLOSE_UNSUPPORTED, _CLOSE_POLICY, _CLOSE_BUSY = 1000, 1003, 1008, 1013


@dataclass
class AppSettings:
    """``server.*``: ``max_queue`` (sessions that may wait), ``images`` (the folder of reference images offered),
    ``image`` (the one chosen first), ``max_image_bytes`` (uploads), ``max_outgoing_s`` (video that may wait for a
    slow client), ``session`` (:class:`SessionOptions`)."""

    max_queue: int = 4
    max_outgoing_s: float = 1.0
    images: Path = Path("data/example")
    image: str | None = None
    max_image_bytes: int = 8 * 2**20
    session: SessionOptions = field(default_factory=SessionOptions)


class ServerState:
    """What the app's handlers share: the pipeline, its thread, the line, the live streams, the counters."""

    def __init__(self, pipe: LiveAvatarPipeline, settings: AppSettings):
        self.pipe, self.settings = pipe, settings
        self.images = gallery(settings.images)
        self.scheduler = Scheduler(settings.max_queue)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liveavatar-model")
        self.streams: weakref.WeakSet = weakref.WeakSet()  # the pipeline streams (KV caches) still alive
        self.last: dict[str, Any] = {}                     # the figures of the last session that ended

    def status(self) -> dict:
        dev = self.pipe.device
        status = {"active": self.scheduler.active is not None, "waiting": self.scheduler.waiting,
                  "served": self.scheduler.served, "live_streams": len(self.streams),
                  "engine": self.pipe.engine, "device": str(dev), "fps": self.pipe.fps, "last": self.last}
        if isinstance(self.pipe, LiveAvatarPipeline):
            if dev.type == "cuda":
                status["device_memory_mb"] = torch.cuda.memory_allocated(dev) / 2**20
        else:  # a TPP group: its ranks, and whether they are in a session
            status["tpp"] = self.pipe.status()
        return status


def create_app(pipe: LiveAvatarPipeline, settings: AppSettings) -> FastAPI:
    """The app over one loaded ``pipe`` (engines ``sequential`` and ``stream_batch``) or a started
    :class:`~.tpp_group.TPPGroup`."""
    state = ServerState(pipe, settings)
    app = FastAPI(title="liveavatar", docs_url=None, redoc_url=None)
    app.state.liveavatar = state
    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (PAGE / "index.html").read_text()

    @app.get("/api/images")
    def images() -> dict:
        names = list(state.images)
        first = settings.image if settings.image in state.images else (names[0] if names else None)
        return {"images": names, "default": first}

    @app.get("/api/images/{name}")
    def image(name: str) -> FileResponse:
        if name not in state.images:  # only the listed files: no paths from the client
            raise HTTPException(404, f"no image {name!r}")
        return FileResponse(state.images[name])

    @app.get("/api/status")
    def status() -> dict:
        return state.status()

    @app.websocket("/ws")
    async def live(websocket: WebSocket) -> None:
        await websocket.accept()
        await Connection(websocket, state).serve()

    return app


class Connection:
    """One client's socket: its start message, its wait in line, its session, its end."""

    def __init__(self, websocket: WebSocket, state: ServerState):
        self.ws, self.state = websocket, state
        self.loop = asyncio.get_running_loop()
        self.outgoing = Outgoing(state.settings.max_outgoing_s, self._want_keyframe)
        self.session: Session | None = None
        self.close_code = _CLOSE_NORMAL
        self.errored = False

    # ------------------------------------------------------------------------------------------ outgoing

    def post(self, message: Any) -> None:
        """Queue a message (bytes, a dict or a :class:`Fragment`) for the client; from the event loop."""
        if isinstance(message, dict) and message.get("type") == "error":
            self.errored = True
        self.outgoing.put(message)

    def _want_keyframe(self) -> None:
        if self.session is not None:
            self.session.request_keyframe()

    def unsent(self) -> dict:
        """The figures of what this client was too slow to take."""
        return {"unsent_blocks": self.outgoing.dropped_blocks, "unsent_frames": self.outgoing.dropped_frames,
                "outgoing_s": self.outgoing.seconds}

    def post_threadsafe(self, message: Any) -> None:
        """Queue a message from the model's thread."""
        self.loop.call_soon_threadsafe(self.post, message)

    async def _send_loop(self) -> None:
        while (message := await self.outgoing.get()) is not None:
            try:
                if isinstance(message, Fragment):
                    await self.ws.send_bytes(message.data)
                    await self.ws.send_json({**message.message, **self.unsent()})
                elif isinstance(message, bytes):
                    if message:
                        await self.ws.send_bytes(message)
                else:
                    await self.ws.send_json(message)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # the client is gone; the reader notices and ends the session

    # ------------------------------------------------------------------------------------------ incoming

    async def _receive(self) -> dict:
        """The next message (``{"type": "websocket.receive", "text" | "bytes": ...}``); raises
        :class:`WebSocketDisconnect` when the client is gone."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message

    async def _read_loop(self) -> str:
        """Feed the session's audio until the client stops (``stop``), leaves (``gone``) or sends what the
        protocol does not allow (``error``, after one error message)."""
        try:
            while True:
                message = await self._receive()
                if message.get("bytes") is not None:
                    samples = pcm16_to_float(message["bytes"])
                    if self.session is not None:  # audio sent while waiting in line is not kept
                        self.session.audio.put(samples)
                    continue
                request = parse_json(message.get("text") or "")
                if request["type"] == "stop":
                    return "stop"
                raise ProtocolError(f"unexpected message of type {request['type']!r} during a session "
                                    "(send audio as binary PCM, or {\"type\": \"stop\"})")
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: receive() after the socket closed
            return "gone"
        except ProtocolError as err:
            self._refuse(str(err), _CLOSE_UNSUPPORTED)
            return "error"

    def _refuse(self, message: str, code: int) -> None:
        self.post({"type": "error", "message": message})
        self.close_code = code

    # ------------------------------------------------------------------------------------------ the session

    async def serve(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._serve()
        finally:
            self.post(None)  # the sender stops after what is queued
            await sender
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await self.ws.close(self.close_code)

    async def _serve(self) -> None:
        state = self.state
        try:
            message = await self._receive()
            if message.get("text") is None:
                raise ProtocolError("expected a JSON start message first, got binary data")
            # Decoding an upload takes a moment: off the event loop, which serves the other sockets.
            image = await asyncio.to_thread(start_image, parse_json(message["text"], "start"), state.images,
                                            state.pipe.components.resolution, state.settings.max_image_bytes)
        except WebSocketDisconnect:
            return
        except ProtocolError as err:
            self._refuse(str(err), _CLOSE_UNSUPPORTED)
            return
        ticket = Ticket(lambda position, waiting: self.post({"type": "queued", "position": position,
                                                             "waiting": waiting}))
        reader = asyncio.create_task(self._read_loop())
        turn = asyncio.create_task(state.scheduler.acquire(ticket))
        try:
            await asyncio.wait({reader, turn}, return_when=asyncio.FIRST_COMPLETED)
            if not turn.done():  # the client left, stopped or misbehaved while waiting
                turn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await turn
                return
            try:
                turn.result()
            except QueueFull as err:
                self._refuse(str(err), _CLOSE_BUSY)
                return
            if reader.done():  # gone in the same instant as its turn came
                return
            await self._run_session(image, reader)
        finally:
            state.scheduler.release(ticket)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _run_session(self, image: torch.Tensor, reader: asyncio.Task) -> None:
        state = self.state
        session = Session(state.pipe, image, state.settings.session, self.post_threadsafe,
                          waiting=lambda: state.scheduler.waiting, streams=state.streams)
        self.session = session
        self.post(session.started_message())
        run = asyncio.ensure_future(self.loop.run_in_executor(state.model_thread, session.run))
        await asyncio.wait({reader, run}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done():  # stop, disconnect or garbage: free the model now
            session.cancel()
        reason = await run
        state.last = dict(session.figures, **self.unsent(),
                          reason=reason if reason != "cancelled" else reader.result())
        if not self.errored and not (reader.done() and reader.result() == "gone"):
            self.post({"type": "ended", **state.last})
