"""``serve.py``: load the pipeline a config names (``conf/serve.yaml``; ``engine=tpp``: start its ranks, see
:mod:`.tpp_group`), build the app and serve it with uvicorn; :class:`BackgroundServer` serves an app from a thread
(tests and ``bench/serve.py``).

The socket is bound here, before uvicorn starts, so that a port in use is one line (and ``server.port=0`` picks a
free port whose URL can be printed).
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from omegaconf import DictConfig

from ..components import UserError
from ..pipeline import LiveAvatarPipeline
from .app import AppSettings, create_app
from .session import SessionOptions

SERVABLE_ENGINES = ("sequential", "stream_batch", "tpp")


class GroupStopped(Exception):
    """The TPP ranks stopped with a failure while serving; the message names the rank."""


def settings_from_config(cfg: DictConfig) -> AppSettings:
    """``server.*`` -> :class:`AppSettings`, each bad value one line."""
    s = cfg.server
    images = Path(s.images)
    if not images.is_dir():
        raise UserError(f"server.images={s.images}: not a folder (the reference images the page offers)")
    checks = [("max_queue", s.max_queue >= 0), ("max_lag_s", s.max_lag_s > 0), ("grace_s", s.grace_s >= 0),
              ("max_outgoing_s", s.max_outgoing_s > 0), ("send_buffer_kb", (s.send_buffer_kb or 0) >= 0),
              ("max_image_mb", s.max_image_mb > 0), ("min_side", s.min_side >= 1),
              ("max_session_s", s.max_session_s is None or s.max_session_s > 0)]
    for key, ok in checks:
        if not ok:
            raise UserError(f"server.{key}={s[key]}: out of range")
    session = SessionOptions(max_lag_s=float(s.max_lag_s), grace_s=float(s.grace_s),
                             max_seconds=None if s.max_session_s is None else float(s.max_session_s),
                             min_side=int(s.min_side), crf=int(s.crf))
    return AppSettings(max_queue=int(s.max_queue), images=images, image=s.image,
                       max_image_bytes=int(float(s.max_image_mb) * 2**20), max_outgoing_s=float(s.max_outgoing_s),
                       session=session)


def check_servable(cfg: DictConfig) -> None:
    """What the server cannot run yet, refused in one line before the model loads."""
    if (cfg.model.get("dit") or {}).get("listening"):
        raise UserError("model.dit.listening=true: serve.py streams one live voice; a listening model's second voice "
                        "(the interlocutor's) is not served yet")
    name = cfg.engine.name
    if name not in SERVABLE_ENGINES:
        raise UserError(f"engine={name}: serve.py runs {', '.join(SERVABLE_ENGINES)}")


def bind(host: str, port: int, send_buffer_kb: float | None = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one). ``send_buffer_kb``: the most data not yet
    sent that the kernel keeps for each connection (``TCP_NOTSENT_LOWAT``, inherited by accepted sockets; data in
    flight on the network is not limited by it). Unlimited, the kernel takes megabytes from a slow client's socket
    (tens of seconds of video) before the server's own bounded queue (``server.max_outgoing_s``) sees any of it."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer_kb and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, int(send_buffer_kb * 1024))
        sock.bind((host, int(port)))
    except (OSError, OverflowError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(f"server.host={host} server.port={port}: cannot listen there: {reason}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):  # every interface: this machine's own name works in a browser here
        host = "localhost"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"


def uvicorn_server(app: FastAPI, cfg: DictConfig | None = None) -> uvicorn.Server:
    ssl = {} if cfg is None else {"ssl_certfile": cfg.server.get("ssl_certfile"),
                                  "ssl_keyfile": cfg.server.get("ssl_keyfile")}
    config = uvicorn.Config(app, log_level="warning", ws_max_size=32 * 2**20, ws_ping_interval=20,
                            **{k: v for k, v in ssl.items() if v})
    return uvicorn.Server(config)


def load(cfg: DictConfig):
    """The pipeline behind the app: one process (``sequential``, ``stream_batch``) or a started TPP group."""
    if cfg.engine.name == "tpp":
        from .tpp_group import TPPGroup

        return TPPGroup.launch(cfg)
    return LiveAvatarPipeline.from_config(cfg)


def run(cfg: DictConfig) -> None:
    """``python serve.py ...``: refuse what cannot be served, load, listen, print the URL, serve until Ctrl-C.
    Raises :class:`GroupStopped` when the TPP ranks failed (the server stops serving then)."""
    check_servable(cfg)
    settings = settings_from_config(cfg)
    # Before the (slow) load: a port in use is said at once.
    sock = bind(cfg.server.host, cfg.server.port, cfg.server.get("send_buffer_kb"))
    pipe = load(cfg)
    try:
        server = uvicorn_server(create_app(pipe, settings), cfg)
        if hasattr(pipe, "on_failure"):  # a failed rank leaves nothing to serve with
            pipe.on_failure(lambda: setattr(server, "should_exit", True))
        scheme = "https" if cfg.server.get("ssl_certfile") else "http"
        where = f"{pipe.world} ranks, {pipe.device.type}" if pipe.engine == "tpp" else str(pipe.device)
        print(f"liveavatar: serving {cfg.model.name} ({pipe.engine}, {where}) on {url_of(sock, scheme)} "
              "- open it in a browser, pick a reference image, press Start and speak", flush=True)
        if scheme == "http" and cfg.server.host not in ("127.0.0.1", "localhost", "::1"):
            print("note: browsers give the microphone only to https pages or to localhost: from another machine, "
                  "forward the port (ssh -L) or set server.ssl_certfile/ssl_keyfile", flush=True)
        server.run(sockets=[sock])
    finally:
        if hasattr(pipe, "close"):
            pipe.close()
    if getattr(pipe, "failed", None):
        raise GroupStopped(pipe.failed)


class BackgroundServer:
    """Serve ``app`` on ``host`` (a free port) from a thread: ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, send_buffer_kb: float | None = 128):
        self.sock = bind(host, port, send_buffer_kb)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
