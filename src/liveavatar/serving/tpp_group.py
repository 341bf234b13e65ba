"""``serve.py engine=tpp``: the server process starts the ranks of a TPP pipeline and streams its sessions through
them, taking the place of the one-process :class:`~liveavatar.pipeline.LiveAvatarPipeline` behind the app.

Processes: the server (this one: the web app, the sessions' audio and MP4 encoding; no model) and one process per
rank (:mod:`.tpp_rank`): ``steps`` DiT ranks and the decoding rank (or the last DiT rank decodes,
``engine.decode_on_last``), in a torch.distributed group (NCCL with one GPU per rank, gloo on the CPU) whose
rendezvous store the server hosts. Between the ranks only block latents and audio features travel, as under
torchrun (:mod:`liveavatar.engine.tpp`). The server speaks to each rank over a local authenticated socket
(``multiprocessing.connection``, pickled tuples):

* server -> every rank: ``("session", sid, image [3, H, W])``: a session starts, from a fresh cache on every rank;
  ``("abort", sid)``: give it up (the rest passes without compute); ``("shutdown",)``;
* server -> rank 0: ``("audio", sid, samples [n])`` one block's audio; ``("end", sid)``: the session's audio ended;
* rank -> server: ``("hello", rank)``, ``("ready", rank)``, ``("error", rank, message, user_error, traceback)``;
  from the output rank ``("block", sid, index, frames uint8 [T, 3, H, W], cost_s)`` and ``("ended", sid)`` once
  every rank is done.

A session's audio is taken by a feeder thread as it comes (so :class:`~.live_audio.LiveAudio`'s pacing, silence and
lag dropping apply as with one process) and sent to rank 0 at most ``in_flight`` blocks ahead of the video that came
back: a pipeline slower than real time leaves the audio waiting in the session, where it is dropped past
``server.max_lag_s``, not queued in the ranks. Each block comes back as soon as the output rank has decoded it.
A rank that fails (or dies) stops the group: the session gets one error line naming the rank that failed first (a
rank that died without a word is named before the ranks whose receives then broke), its traceback goes to the
server's stderr, and the server exits.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import queue
from datetime import timedelta
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from ..components import Components, UserError, resolve_device
from ..engine import tpp
from ..pipeline import StreamBlock, dit_config, engine_settings

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the liveavatar package


class TPPGroup:
    """The ranks of a TPP pipeline behind the app, with the interface the sessions use (``stream``, ``fps``,
    ``dit``, ``components.resolution``, ``engine``, ``device``). Start it with :meth:`launch`; :meth:`close` it."""

    engine = "tpp"

    def __init__(self, cfg: DictConfig):
        """The group's settings, checked (each mistake one line); no process is started yet."""
        if "RANK" in os.environ:
            raise UserError("serve.py engine=tpp starts its ranks itself: run it with python, not torchrun")
        e = cfg.engine
        self.layout = tpp.Layout(len(cfg.denoise.steps), bool(e.decode_on_last))
        try:
            settings = engine_settings(cfg)
        except ValueError as err:
            raise UserError(str(err)) from err
        if settings.history != "timestep_forced":
            raise UserError(f"engine=tpp needs engine.history=timestep_forced (each rank caches its own step's "
                            f"history), got {settings.history}")
        self.dit = dit_config(cfg)
        self.components = Components(cfg.model, "cpu")  # geometry only: this process builds no model
        self.device = resolve_device(cfg.device)
        check_devices(self.layout, self.device.type, torch.cuda.device_count() if self.device.type == "cuda" else 0)
        self.cfg = cfg
        self.world = self.layout.world_size
        self.in_flight = self.world + 1          # blocks fed ahead of the video back: one per stage, one in transit
        self.poll_s = float(e.fault_poll_s)
        self.timeout_s = float(e.timeout_s)
        self.failed: str | None = None           # the first failure, once the group has stopped
        self._on_failure: list[Callable[[], None]] = []
        self.events: queue.Queue = queue.Queue()  # (kind, ...) from every rank, and ("failed", message)
        self._procs: list[subprocess.Popen] = []
        self._conns: dict[int, Connection] = {}
        self._locks = {r: threading.Lock() for r in range(self.world)}
        self._said: set[int] = set()             # ranks that reported their own error
        self._fail_lock = threading.Lock()
        self._session = 0
        self.active: int | None = None           # the session the ranks are in, None between sessions
        self._closing = False

    @property
    def fps(self) -> float:
        return self.components.fps

    # ------------------------------------------------------------------------------------------ start, stop

    @classmethod
    def launch(cls, cfg: DictConfig) -> "TPPGroup":
        """Check the settings, start every rank and wait until each has loaded its part (or one failed: then
        every rank is stopped and the failure raised as one-line :class:`UserError`)."""
        group = cls(cfg)
        group._start()
        return group

    def _start(self) -> None:
        key = secrets.token_bytes(16)
        self._listener = Listener(family="AF_UNIX", authkey=key)
        # The rendezvous store lives here, so that it outlives any rank (torchrun's agent store, as it were).
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=self.timeout_s))
        spec = json.dumps({"config": OmegaConf.to_container(self.cfg, resolve=True),
                           "address": self._listener.address, "authkey": key.hex()})
        env = {**os.environ, "WORLD_SIZE": str(self.world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(self._store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
        if self.device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # device=cpu: the ranks too
            env["OMP_NUM_THREADS"] = str(self.cfg.engine.threads_per_rank)
        for rank in range(self.world):
            # A session of its own: the terminal's Ctrl-C reaches the server, which stops the ranks in order.
            proc = subprocess.Popen([sys.executable, "-m", "liveavatar.serving.tpp_rank"], stdin=subprocess.PIPE,
                                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True)
            proc.stdin.write(spec.encode())
            proc.stdin.close()
            self._procs.append(proc)
        threading.Thread(target=self._accept, daemon=True, name="liveavatar-tpp-accept").start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._watch, daemon=True, name="liveavatar-tpp-watch").start()

    def _accept(self) -> None:
        try:
            for _ in range(self.world):
                conn = self._listener.accept()
                kind, rank = conn.recv()
                self._conns[rank] = conn
                threading.Thread(target=self._read, args=(rank, conn), daemon=True,
                                 name=f"liveavatar-tpp-rank{rank}").start()
        except (OSError, EOFError):
            pass  # closed while starting: a rank failed

    def _read(self, rank: int, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the process ended; the watcher says why
            if message[0] == "error":
                _, rank, text, user, trace = message
                self._said.add(rank)
                if not user:  # a peer that died silently is the cause, and this rank's error its consequence
                    time.sleep(self.poll_s)
                    self._check_processes()
                self._fail(text, user=user, trace=trace)
            else:
                self.events.put(message)

    def _wait_ready(self) -> None:
        ready = set()
        while len(ready) < self.world:
            if self.failed is not None:
                raise UserError(self.failed)
            try:
                message = self.events.get(timeout=self.poll_s)
            except queue.Empty:
                self._check_processes()
                continue
            if message[0] == "ready":
                ready.add(message[1])

    def _check_processes(self) -> None:
        for rank, proc in enumerate(self._procs):
            if proc.poll() is None or self._closing or rank in self._said:
                continue
            time.sleep(self.poll_s)  # its own error message may still be on the way
            if rank not in self._said:
                code = proc.returncode
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                self._fail(f"rank {rank} {how} without a word")

    def _watch(self) -> None:
        while self.failed is None and not self._closing:
            self._check_processes()
            time.sleep(self.poll_s)

    def _fail(self, message: str, user: bool = False, trace: str | None = None) -> None:
        with self._fail_lock:  # the first failure wins
            if self.failed is not None:
                return
            self.failed = message
        if trace:
            print(trace, end="", file=sys.stderr, flush=True)
        if not user:
            try:  # the other ranks' watchdogs stop them (a dead rank could not say so itself)
                dist.PrefixStore("default_pg", self._store).set(tpp.ERROR_KEY, message)
            except Exception:  # noqa: BLE001
                pass
        self.events.put(("failed", message))
        for callback in self._on_failure:
            callback()

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from another thread) when the group stops with a failure."""
        self._on_failure.append(callback)
        if self.failed is not None:
            callback()

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop every rank (politely, then not) and free what the group holds. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        for rank in list(self._conns):
            self._send(rank, ("shutdown",))
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns.values():
            conn.close()
        self._listener.close()

    # ------------------------------------------------------------------------------------------ sessions

    def _send(self, rank: int, message: tuple) -> None:
        conn = self._conns.get(rank)
        if conn is None:
            return
        with self._locks[rank]:
            try:
                conn.send(message)
            except (OSError, EOFError, ValueError):
                pass  # the rank is gone; the watcher reports it

    def abort(self, sid: int) -> None:
        for rank in range(self.world):
            self._send(rank, ("abort", sid))

    def status(self) -> dict:
        return {"ranks": self.world, "ranks_in_session": self.world if self.active is not None else 0,
                "failed": self.failed}

    def stream(self, image: torch.Tensor, chunks: Iterator[np.ndarray]) -> "TPPStream":
        """Start a session on every rank: ``image`` ``[3, H, W]`` in [-1, 1] at the model's resolution; ``chunks``:
        the audio of one block at a time, taken as the pipeline has room (it may block). Returns the decoded blocks
        as :class:`~liveavatar.pipeline.StreamBlock` s (``frames`` uint8)."""
        if self.failed is not None:
            raise UserError(f"the TPP ranks stopped: {self.failed}")
        self._session += 1
        sid = self.active = self._session
        pixels = image.detach().float().cpu().numpy()
        for rank in range(self.world):
            self._send(rank, ("session", sid, pixels))
        return TPPStream(self, sid, chunks)

    def next_event(self, sid: int) -> tuple:
        """The next message of session ``sid`` (others, left from earlier sessions, are skipped); raises
        :class:`UserError` once the group has failed."""
        while True:
            message = self.events.get()
            if message[0] == "failed":
                self.events.put(message)  # for whoever asks next
                raise UserError(f"the TPP ranks stopped: {message[1]}")
            if message[1] == sid:
                return message


class TPPStream:
    """One session's blocks from a :class:`TPPGroup`: iterate for :class:`~liveavatar.pipeline.StreamBlock` s;
    ``block_cost_s`` is the last block's cost (the slowest stage's compute on it). :meth:`close` gives the session
    up and returns once every rank has left it (within about one forward)."""

    def __init__(self, group: TPPGroup, sid: int, chunks: Iterator[np.ndarray]):
        self.group, self.sid = group, sid
        self.block_cost_s: float | None = None
        self._credits = threading.Semaphore(group.in_flight)
        self._stop = threading.Event()
        self._given_up = False                   # the session ended early: its blocks are not wanted
        self._reason: BaseException | None = None  # why (SessionCancelled, or the audio source's error)
        self._done = False
        self._feeder = threading.Thread(target=self._feed, args=(chunks,), daemon=True, name="liveavatar-tpp-feed")
        self._feeder.start()

    def _feed(self, chunks: Iterator[np.ndarray]) -> None:
        try:
            while not self._stop.is_set():
                if not self._credits.acquire(timeout=0.05):
                    continue
                if self._stop.is_set():
                    break
                samples = next(chunks)  # waits for the client's audio (or its grace) as LiveAudio paces it
                self.group._send(0, ("audio", self.sid, np.asarray(samples, dtype=np.float32)))
        except StopIteration:
            pass
        except BaseException as err:  # noqa: BLE001 - SessionCancelled, or the source failed: give the session up
            self._reason = err.with_traceback(None)  # (its frames would hold this stream alive)
            self._given_up = True
            self.group.abort(self.sid)
        finally:
            self.group._send(0, ("end", self.sid))

    def __iter__(self) -> "TPPStream":
        return self

    def __next__(self) -> StreamBlock:
        while not self._done:
            kind, _, *rest = self.group.next_event(self.sid)
            if kind == "block":
                self._credits.release()
                if self._given_up:
                    continue  # decoded before the ranks heard: nobody will watch it
                index, frames, self.block_cost_s = rest
                return StreamBlock(index, torch.from_numpy(frames))
            if kind == "ended":
                self._end()
        reason, self._reason = self._reason, None
        if reason is not None:
            try:
                raise reason
            finally:
                reason = None  # (a local holding the exception would hold its traceback, this frame, this stream)
        raise StopIteration

    def _end(self) -> None:
        self._done = True
        self._stop.set()
        self.group.active = None
        # The feeder has stopped (or is at most waiting out one block's audio): once it is gone, nothing holds
        # this stream, and the session's end frees it.
        self._feeder.join(timeout=2.0)

    def close(self) -> None:
        if self._done:
            return
        self._stop.set()
        self._given_up, self._reason = True, None
        self.group.abort(self.sid)
        try:
            while not self._done:
                kind, *_ = self.group.next_event(self.sid)
                if kind == "block":
                    self._credits.release()
                elif kind == "ended":
                    self._end()
        except UserError:
            self._done = True


def check_devices(layout: tpp.Layout, device_type: str, visible: int) -> None:
    """One GPU per rank: refuse (one line) a layout with more ranks than GPUs visible."""
    if device_type == "cuda" and visible < layout.world_size:
        raise UserError(f"engine=tpp with {layout.steps} steps runs {layout.world_size} ranks ({layout.steps} DiT ranks"
                        f"{'' if layout.decode_on_last else ' + 1 decoding rank'}), one GPU each; {visible} visible "
                        "(fewer denoise.steps, engine.decode_on_last=true, or device=cpu)")
