"""Timestep-forcing Pipeline Parallelism (TPP) over torch.distributed point-to-point messages.

Ranks ``0 .. N-1`` each run one fixed denoising step of an N-step list and hold only that step's
timestep-forced KV cache (one lane); the output rank decodes with the streaming VAE and writes the video (rank
``N``, or rank ``N-1`` itself with ``engine.decode_on_last=true``). Block ``b`` enters rank 0 as noise; rank
``s`` forwards it at step ``s``, writes its own cache, re-noises the clean estimate to step ``s+1`` and sends
it on. Only the block latent and the block's audio features travel; caches never move. In steady state every
rank works on a different block, so a block comes out every forward.

Messages are a fixed-size int64 header (kind, block, shapes of the tensors that follow, and the block's cost so far:
the longest compute of one stage on it, in microseconds) and float32 payloads, sent in the same order on both sides
(NCCL matches by order, not tags). With a sink that changes (``aas``, or
``reference`` with ``keep_first_block``) the last DiT rank also sends block 0's clean latents once to every other
DiT rank; each takes it before block ``switch_block``, or at the end of a stream too short to reach that block,
so that no send is left unmatched. Heartbeats flow down the pipeline while the audio source is idle, so a quiet
stream never trips the process-group timeout. Faults: a rank that raises writes its error into the rendezvous
store; a watchdog thread on every rank polls the store and exits its process within ``engine.fault_poll_s``
naming the failed rank.
"""
from __future__ import annotations

import json
import os
import _thread
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .stream import StreamCore

HEADER = 32
MAX_DIMS = 6
COST = HEADER - 1  # header slot of the block's cost so far (microseconds)
BLOCK, HEARTBEAT, STOP, SINK = 0, 1, 2, 3
ERROR_KEY = "liveavatar/tpp/error"


@dataclass
class Layout:
    """Who does what: ``steps`` DiT ranks, then the output rank (or the last DiT rank decodes)."""

    steps: int
    decode_on_last: bool = False

    @property
    def world_size(self) -> int:
        return self.steps + (0 if self.decode_on_last else 1)

    @property
    def output_rank(self) -> int:
        return self.steps - 1 if self.decode_on_last else self.steps

    def is_dit(self, rank: int) -> bool:
        return rank < self.steps


@dataclass
class RankStats:
    """Seconds a rank spent waiting for input and sending; compute is the rest of its streaming time (the DiT
    forward, re-noising, and on the output rank decoding and writing)."""

    rank: int
    role: str
    compute_s: float = 0.0
    wait_s: float = 0.0
    send_s: float = 0.0
    blocks: int = 0

    @property
    def wait_share(self) -> float:
        total = self.compute_s + self.wait_s + self.send_s
        return self.wait_s / total if total else 0.0


class Channel:
    """Point-to-point messages with explicit shape headers; sends are asynchronous (buffers are kept until
    their ``wait()``, as an ``isend`` buffer must not be reused before it completes)."""

    def __init__(self, device: torch.device, stats: RankStats):
        self.device, self.stats = device, stats
        self.pending: dict[int, list] = {}  # destination -> sends in flight
        self.received_cost_s = 0.0          # the cost the last message received carried

    def send(self, dst: int, kind: int, block: int = -1, tensors: list[torch.Tensor] = (), cost_s: float = 0.0
             ) -> None:
        """Send a message; first wait for the previous message to ``dst`` (at most one in flight per
        destination: backpressure without ever waiting on an unrelated peer). ``cost_s``: the block's cost so far
        (the longest compute one stage spent on it)."""
        t0 = time.perf_counter()
        self.flush(dst)
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0], header[1], header[2] = kind, block, len(tensors)
        header[COST] = round(cost_s * 1e6)
        payload = []
        for i, t in enumerate(tensors):
            if t.dim() > MAX_DIMS:
                raise ValueError(f"cannot send a {t.dim()}-d tensor (at most {MAX_DIMS})")
            base = 3 + i * (MAX_DIMS + 1)
            header[base] = t.dim()
            header[base + 1 : base + 1 + t.dim()] = torch.tensor(t.shape)
            payload.append(t.detach().to(self.device, torch.float32).contiguous())
        header = header.to(self.device)
        works = self.pending.setdefault(dst, [])
        works.append((dist.isend(header, dst), header))
        for p in payload:
            works.append((dist.isend(p, dst), p))
        self.stats.send_s += time.perf_counter() - t0

    def flush(self, dst: int | None = None) -> None:
        """Wait for the sends to ``dst`` (all destinations if None); their buffers are released after."""
        for d in [dst] if dst is not None else list(self.pending):
            for work, _ in self.pending.pop(d, []):
                work.wait()

    def recv(self, src: int) -> tuple[int, int, list[torch.Tensor]]:
        t0 = time.perf_counter()
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        header = header.cpu()
        kind, block, n = int(header[0]), int(header[1]), int(header[2])
        self.received_cost_s = int(header[COST]) / 1e6
        tensors = []
        for i in range(n):
            base = 3 + i * (MAX_DIMS + 1)
            shape = header[base + 1 : base + 1 + int(header[base])].tolist()
            t = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.recv(t, src)
            tensors.append(t)
        self.stats.wait_s += time.perf_counter() - t0
        return kind, block, tensors


class ComputeClock:
    """A stage's compute seconds per block, without waiting for the device: on the CPU the wall time of the work;
    on CUDA two events recorded around it on the stream, read once they have completed, so a block reports the
    latest measurement finished by then (one or two blocks late)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.last_s = 0.0

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> float:
        """The seconds of the work since ``started``, or on CUDA of the latest finished work."""
        if not self.cuda:
            self.last_s = time.perf_counter() - started
            return self.last_s
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end))
        while self.pending and self.pending[0][1].query():
            begin, done = self.pending.pop(0)
            self.last_s = begin.elapsed_time(done) / 1000
        return self.last_s


class GroupFailure(RuntimeError):
    """A TPP group stopped because one rank failed; the message names that rank and its error."""


class PeerFailure(GroupFailure):
    """Another rank failed."""


class RankFailure(GroupFailure):
    """This rank failed (its own error is ``__cause__``) and has told the others. Raised by the failed rank itself,
    so that the line naming it is printed even when the launcher stops the other ranks before their watchdogs do."""


def describe_failure(rank: int, err: BaseException) -> str:
    """The one line that names a failed rank and its error, as every rank of the group prints it."""
    return f"rank {rank}: {type(err).__name__}: {err}"


class Watchdog:
    """Stops this rank, in bounded time, when another rank reports a failure in the rendezvous store.

    It interrupts the main thread first (so that open outputs are cleaned up: the video writer deletes its
    partial file) and ends the process outright if the main thread has not left within ``grace_s`` (it may be
    blocked in a receive from the dead rank).
    """

    def __init__(self, store, rank: int, poll_s: float, grace_s: float = 5.0):
        self.store, self.rank, self.poll_s, self.grace_s = store, rank, poll_s, grace_s
        self.peer_error: str | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if not self.store.check([ERROR_KEY]):
                    continue
                message = self.store.get(ERROR_KEY).decode()
            except Exception:  # the store is gone: the launcher is tearing the group down
                message = "the rendezvous store went away (another rank or the launcher exited)"
            if message.startswith(f"rank {self.rank}:"):
                return
            self.peer_error = message
            _thread.interrupt_main()
            if not self._stop.wait(self.grace_s):
                print(f"error: tpp stopped on rank {self.rank}: {message}", file=sys.stderr, flush=True)
                os._exit(3)
            return

    def report(self, err: BaseException) -> None:
        """Publish this rank's failure; the first failure of the run wins."""
        try:
            if self.store.add(ERROR_KEY + "/count", 1) == 1:
                self.store.set(ERROR_KEY, describe_failure(self.rank, err))
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()


class AudioFeed:
    """Rank 0's audio source, read in a background thread so that waiting for audio never blocks heartbeats.

    ``source`` yields one block's grouped features (or None for an audio-free model) at a time; a live source
    may block for as long as it likes between blocks.
    """

    _END = object()

    def __init__(self, source: Iterable):
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        threading.Thread(target=self._fill, args=(source,), daemon=True).start()

    def _fill(self, source) -> None:
        try:
            for item in source:
                self._queue.put(item)
        except BaseException as err:  # re-raised on the main thread
            self._error = err
        self._queue.put(self._END)

    def get(self, timeout: float):
        """The next block's features; raises ``queue.Empty`` after ``timeout`` and StopIteration at the end."""
        item = self._queue.get(timeout=timeout)
        if item is self._END:
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item


@dataclass
class StageOptions:
    heartbeat_s: float = 10.0
    simulate_forward_ms: float | None = None  # benchmark only: a stage's compute becomes a fixed sleep
    # A stream given up (a live session that ended): while this returns True, blocks pass without compute, so
    # every message still flows as the protocol expects and the stream ends within one forward.
    skip: Callable[[], bool] | None = None
    # Fault drills (tests, operations): LIVEAVATAR_TPP_FAIL="rank:block" makes that rank raise at that block;
    # "rank:block:kill" makes it die with SIGKILL instead (no chance to report anything).
    fail_at: tuple[int, int, bool] | None = field(
        default_factory=lambda: _parse_fail(os.environ.get("LIVEAVATAR_TPP_FAIL")))


def _parse_fail(value: str | None) -> tuple[int, int, bool] | None:
    if not value:
        return None
    rank, block, *mode = value.split(":")
    return int(rank), int(block), mode == ["kill"]


class DiTStage:
    """One denoising step of the pipeline (rank ``step``)."""

    def __init__(self, core: StreamCore, step: int, layout: Layout, channel: Channel, options: StageOptions):
        core.require_step_pipeline("tpp")
        self.core, self.step, self.layout, self.channel, self.options = core, step, layout, channel, options
        self.last = step == layout.steps - 1
        self.next_block = 0  # rank 0: index of the next block taken from the audio feed
        self.cost_s = 0.0    # the last block's cost so far (the longest compute of one stage on it, this one's too)
        self.clock = ComputeClock(core.device)
        # Non-last ranks with a changing sink: block 0 has passed through this rank, so the last rank will send
        # (or has sent) its clean latents, and this rank has not received them yet.
        self.sink_in_flight = False

    @torch.no_grad()
    def _compute(self, x, block, grouped):
        core = self.core
        if self.options.fail_at is not None and self.options.fail_at[:2] == (self.step, block):
            if self.options.fail_at[2]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at block {block} (LIVEAVATAR_TPP_FAIL)")
        if self.options.skip is not None and self.options.skip():
            return x, x  # given up: what passes on is never used
        if self.options.simulate_forward_ms is not None:
            time.sleep(self.options.simulate_forward_ms / 1000)
            x0 = x.clone()
        else:
            v = core.forward(x, core.timesteps[self.step].reshape(1), [0], [block], core.audio_tokens(grouped),
                             write=True)
            x0 = core.step_output(x, v, self.step)
        out = x0 if self.last else core.renoise(x0, block, self.step + 1)
        self.channel.stats.blocks += 1
        return x0, out

    def _receive_sink(self) -> None:
        """Take block 0's clean latents from the last rank (the one SINK message it sends to this rank)."""
        kind, _, (first,) = self.channel.recv(self.layout.steps - 1)
        if kind != SINK:
            raise RuntimeError(f"rank {self.step} expected the sink from the last rank, got message kind {kind}")
        self.core.sink.first_block_done(first.to(self.core.dtype))
        self.sink_in_flight = False

    def _next_input(self, feed: AudioFeed | None):
        """(kind, block, x, grouped) from the audio feed (rank 0) or the previous rank."""
        if self.step == 0:
            t0 = time.perf_counter()
            try:
                grouped = feed.get(timeout=self.options.heartbeat_s)
            except queue.Empty:
                return HEARTBEAT, -1, None, None
            except StopIteration:
                return STOP, -1, None, None
            finally:
                self.channel.stats.wait_s += time.perf_counter() - t0
            block, self.next_block = self.next_block, self.next_block + 1
            self.cost_s = 0.0
            return BLOCK, block, self.core.noise(block, 0), grouped
        kind, block, tensors = self.channel.recv(self.step - 1)
        self.cost_s = self.channel.received_cost_s
        x = tensors[0] if tensors else None
        grouped = tensors[1] if len(tensors) > 1 else None
        return kind, block, x, grouped

    def run(self, feed: AudioFeed | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Process blocks until the stream ends; on the last rank with decode_on_last, yield ``(block, x0)``."""
        core, layout = self.core, self.layout
        downstream = None if (self.last and layout.decode_on_last) else (
            self.step + 1 if not self.last else layout.output_rank)
        while True:
            kind, block, x, grouped = self._next_input(feed)
            if kind in (HEARTBEAT, STOP):
                if downstream is not None:
                    self.channel.send(downstream, kind)
                if kind == STOP:
                    # A stream shorter than switch_block never needed the sink, but the last rank sent it all
                    # the same: receive it, or the last rank's final flush waits until the group times out.
                    if self.sink_in_flight:
                        self._receive_sink()
                    self.channel.flush()
                    return
                continue
            if self.sink_in_flight and block >= core.settings.switch_block:
                self._receive_sink()
            if block == 0 and core.sink.needs_first_block and not self.last:
                self.sink_in_flight = True
            started = self.clock.start()
            x0, out = self._compute(x.to(core.device), block, grouped)
            self.cost_s = max(self.cost_s, self.clock.stop(started))
            if self.last and block == 0 and core.sink.needs_first_block:
                core.sink.first_block_done(x0)
                for r in range(layout.steps - 1):
                    self.channel.send(r, SINK, 0, [x0])
            if downstream is None:
                yield block, x0
            else:
                self.channel.send(downstream, BLOCK, block, [out] + ([grouped] if grouped is not None else []),
                                  cost_s=self.cost_s)


def receive_blocks(channel: Channel, src: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The output rank's input: ``(block, x0)`` until the stream stops (heartbeats are skipped)."""
    while True:
        kind, block, tensors = channel.recv(src)
        if kind == STOP:
            return
        if kind == BLOCK:
            channel.stats.blocks += 1
            yield block, tensors[0]


def init_process_group(timeout_s: float) -> tuple[int, int, torch.device]:
    """Join the torchrun group: NCCL with one GPU per local rank where CUDA is present, gloo on the CPU."""
    if "RANK" not in os.environ:
        raise RuntimeError("engine=tpp must be launched by torchrun (RANK is not set)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return rank, dist.get_world_size(), device


def default_store():
    return dist.distributed_c10d._get_default_store()


def publish_stats(stats: RankStats) -> None:
    default_store().set(f"liveavatar/tpp/stats/{stats.rank}", json.dumps(stats.__dict__))


def collect_stats(world_size: int) -> list[RankStats]:
    store = default_store()
    out = []
    for r in range(world_size):
        data = json.loads(store.get(f"liveavatar/tpp/stats/{r}").decode())
        out.append(RankStats(**data))
    return out


def stats_table(stats: list[RankStats]) -> str:
    lines = ["rank  role        blocks  compute s  wait s  send s  wait share"]
    for s in stats:
        lines.append(f"{s.rank:>4}  {s.role:<10} {s.blocks:>7}  {s.compute_s:>9.2f}  {s.wait_s:>6.2f}  "
                     f"{s.send_s:>6.2f}  {s.wait_share:>9.1%}")
    busiest = max(stats, key=lambda s: s.compute_s)
    lines.append(f"bottleneck: rank {busiest.rank} ({busiest.role}), {busiest.compute_s:.2f} s of compute")
    return "\n".join(lines)
