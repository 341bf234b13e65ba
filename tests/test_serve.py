"""serve.py: the fragmented MP4 stream, the live audio's pacing, the queue, the bounded outgoing queue of a slow client,
and whole sessions over a real socket (a plain WebSocket client, and headless Chromium with a fake microphone) on the
tiny model with random weights, in one process and through a TPP group (engine=tpp: 2 DiT ranks + the decoding rank,
gloo)."""
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from liveavatar import media
from liveavatar.components import UserError
from liveavatar.pipeline import LiveAvatarPipeline
from liveavatar.serving.app import create_app
from liveavatar.serving.fmp4 import FragmentWriter, annexb_to_avcc
from liveavatar.serving.live_audio import LiveAudio, SessionCancelled
from liveavatar.serving.outgoing import Fragment, Outgoing
from liveavatar.serving.protocol import pcm16_to_float
from liveavatar.serving.server import BackgroundServer, settings_from_config
from liveavatar.serving.session import BlockClock

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "data/example/reference.png"
SPEECH = ROOT / "data/example/speech.wav"
CHROMIUM = Path("/usr/bin/chromium")


def serve_config(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("serve", ["denoise.steps=[1000,500]", *overrides])  # two steps: well inside real time here


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    """One loaded tiny pipeline (random non-zero weights) per engine, shared by the module's tests."""
    loaded = {}

    def get(engine="sequential"):
        if engine not in loaded:
            loaded[engine] = LiveAvatarPipeline.from_config(serve_config(f"checkpoint={tiny_checkpoint}",
                                                                         f"engine={engine}"))
        return loaded[engine]

    return get


@contextmanager
def serving(pipes, *overrides, engine="sequential"):
    """A server on a free local port: yields (ws url, http url, app state). ``pipes``: the ``pipes`` fixture (a
    pipeline per engine), or the pipeline (or TPP group) itself."""
    app = create_app(pipes(engine) if callable(pipes) else pipes, settings_from_config(serve_config(*overrides)))
    with BackgroundServer(app) as url:
        yield url.replace("http://", "ws://") + "ws", url, app.state.liveavatar


@pytest.fixture(params=["sequential", "tpp"])
def live_pipe(request, pipes):
    """The one-process sequential pipeline, then the TPP group: what both serve alike."""
    return request.getfixturevalue("tpp_group") if request.param == "tpp" else pipes(request.param)


def speech_pcm(seconds: float) -> bytes:
    wav = media.read_audio(SPEECH)[: int(seconds * 16000)]
    return (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()


def receive(ws, timeout=10.0):
    """The next message: bytes, or the JSON as a dict."""
    message = ws.recv(timeout=timeout)
    return message if isinstance(message, bytes) else json.loads(message)


def receive_until(ws, predicate, timeout=10.0):
    """Messages until one satisfies ``predicate`` (returned with all before it)."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.01, deadline - time.monotonic()))
        seen.append(message)
        if predicate(message):
            return seen


def of_type(kind):
    return lambda m: isinstance(m, dict) and m.get("type") == kind


def start(ws, **fields):
    ws.send(json.dumps({"type": "start", "image": "reference.png", **fields}))


def closed_after(ws, timeout=10.0) -> list:
    """Every message until the server closes the socket."""
    seen = []
    try:
        while True:
            seen.append(receive(ws, timeout))
    except ConnectionClosed:
        return seen


def status(http_url) -> dict:
    import urllib.request

    with urllib.request.urlopen(http_url + "api/status", timeout=10) as r:
        return json.loads(r.read())


def decode(stream: bytes):
    """Fragmented MP4 bytes -> (frames uint8 [T, H, W, 3], their times in s, audio float32 [n] at 48 kHz)."""
    with av.open(io.BytesIO(stream)) as c:
        video = [(f.to_ndarray(format="rgb24"), float(f.time)) for f in c.decode(video=0)]
    with av.open(io.BytesIO(stream)) as c:
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    return np.stack([v for v, _ in video]), [t for _, t in video], audio


def cells(frames: np.ndarray, scale: int) -> np.ndarray:
    """Undo the nearest upscaling: the mean of the inner half of each scale x scale cell (4:2:0 chroma bleeds
    across the cells' borders), [T, 3, h, w] float."""
    t, h, w, c = frames.shape
    inner = slice(scale // 4, scale - scale // 4)
    x = frames.reshape(t, h // scale, scale, w // scale, scale, c)[:, :, inner, :, inner]
    return x.astype(np.float64).mean(axis=(2, 4)).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ fragments


def test_each_block_is_one_playable_fragment_with_its_frames_and_audio():
    fps, scale = 25, 8
    writer = FragmentWriter(32, 32, fps, scale=scale)
    assert writer.init[4:8] == b"ftyp"
    g = torch.Generator().manual_seed(0)
    blocks = [(torch.rand(3, 3, 4, 4, generator=g) * 2 - 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
              for _ in range(6)]
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(6 * 1920) / 16000)).astype(np.float32)
    fragments = [writer.write(b, tone[i * 1920 : (i + 1) * 1920]) for i, b in enumerate(blocks)]
    assert all(f[4:8] == b"moof" for f in fragments)
    # No frame waits for the next block: the init + the first k fragments hold exactly 3k frames, at their times.
    for k in (1, 4):
        frames, times, _ = decode(writer.init + b"".join(fragments[:k]))
        assert len(frames) == 3 * k
        assert np.allclose(times, np.arange(3 * k) / fps)
    frames, _, audio = decode(writer.init + b"".join(fragments) + writer.close())
    assert frames.shape == (18, 256, 256, 3)
    given = media.to_uint8(torch.cat(blocks)).numpy().astype(np.float64)
    assert np.abs(cells(frames, scale) - given).mean() < 4  # H.264 at crf 23, against levels 0..255
    # The audio track is the given audio (48 kHz after resampling), aligned with the video's time 0.
    heard = audio[: 3 * len(tone)][::3][200 : len(tone) - 1024]
    assert np.corrcoef(heard, tone[200 : 200 + len(heard)])[0, 1] > 0.95


def test_a_slow_client_loses_whole_old_fragments_and_what_it_gets_still_decodes_in_order():
    """A client that takes one block while three are made, 0.5 s of video allowed to wait: old fragments go (each
    with those that decode from it), keyframes are asked for while it lags, and what it gets is a stream that
    decodes to the frames of the blocks it kept, in order, at their times."""
    writer = FragmentWriter(32, 32, 25, scale=8)
    asked = []
    out = Outgoing(0.5, want_keyframe=lambda: asked.append(True))
    out.put(writer.init)
    g = torch.Generator().manual_seed(0)
    blocks = [(torch.rand(3, 3, 4, 4, generator=g) * 2 - 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
              for _ in range(24)]
    sent = []

    async def slow_client():
        for i, block in enumerate(blocks):
            data = writer.write(block, np.zeros(1920, np.float32), keyframe=bool(asked))
            asked.clear()
            if i % 3 == 0 and (i == 0 or out.seconds > 0):
                sent.append(await out.get())  # the one message it takes while three blocks are made
            out.put(Fragment(data, 3, 0.12, writer.keyframe, {"index": i}))
            assert out.seconds <= 0.5 + 1e-9
        while out.seconds:
            sent.append(await out.get())

    asyncio.run(slow_client())
    fragments = [m for m in sent if isinstance(m, Fragment)]
    kept = [f.message["index"] for f in fragments]
    assert isinstance(sent[0], bytes) and kept == sorted(kept) and 6 <= len(kept) <= 12
    assert out.dropped_blocks == 24 - len(kept) and out.dropped_frames == 3 * out.dropped_blocks
    # Each run of consecutive blocks starts with a keyframe: nothing refers to a fragment that was left out.
    assert all(f.keyframe for f, before in zip(fragments, [None] + kept) if f.message["index"] - 1 != before)
    frames, times, _ = decode(sent[0] + b"".join(f.data for f in fragments))
    assert np.allclose(times, [(3 * k + j) / 25 for k in kept for j in range(3)])
    given = media.to_uint8(torch.cat([blocks[k] for k in kept])).numpy()
    assert np.abs(cells(frames, 8) - given).mean() < 4  # not concealment of missing references


def test_annexb_to_avcc_prefixes_each_nal_unit_with_its_length():
    stream = b"\x00\x00\x00\x01\x67\xaa\xbb" + b"\x00\x00\x01\x68\xcc" + b"\x00\x00\x01\x65\x01\x02\x03"
    assert annexb_to_avcc(stream) == (b"\x00\x00\x00\x03\x67\xaa\xbb" + b"\x00\x00\x00\x02\x68\xcc"
                                      + b"\x00\x00\x00\x04\x65\x01\x02\x03")


# ------------------------------------------------------------------------------------------------ live audio


def test_live_audio_drops_whole_blocks_past_the_lag_and_counts_them():
    audio = LiveAudio(16000, max_lag_s=0.02, grace_s=0.0)  # a block is 160 samples (10 ms); 2 blocks may wait
    audio.put(np.arange(5 * 160, dtype=np.float32))
    block = audio.take(160)
    assert (audio.dropped_blocks, audio.dropped_samples) == (2, 320)
    assert block.client_start == 320 and block.samples[0] == 320  # the oldest went, the order kept
    assert audio.backlog_s == pytest.approx(0.02)


def test_live_audio_is_silence_when_the_client_sends_nothing_and_stops_on_cancel():
    audio = LiveAudio(16000, max_lag_s=1.0, grace_s=0.01)
    t0 = time.monotonic()
    block = audio.take(160)
    assert block.client_start is None and not block.samples.any() and audio.silent_blocks == 1
    assert time.monotonic() - t0 < 0.5
    audio.put(np.ones(100, np.float32))  # late audio is used later, not lost
    audio.put(np.ones(60, np.float32))
    assert audio.take(160).client_start == 0
    # Waiting for audio that does not come (a long grace), a cancel from another thread ends it at once.
    waiting = LiveAudio(16000, max_lag_s=1.0, grace_s=30.0)
    threading.Timer(0.05, waiting.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(SessionCancelled):
        waiting.take(160)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------------ sessions


@pytest.mark.parametrize("engine", ["sequential", "stream_batch"])
def test_the_served_video_is_the_pipelines_stream_of_the_clients_audio(pipes, engine):
    pipe = pipes(engine)
    pcm = speech_pcm(1.2)
    # Near-lossless H.264 (crf 4), so that the comparison below is tight.
    with serving(pipes, "server.max_lag_s=30", "server.crf=4", engine=engine) as (ws_url, _, _):
        with connect(ws_url) as ws:
            start(ws)
            started = receive(ws)
            assert started["type"] == "started" and started["width"] == 256 and "avc1" in started["mime"]
            ws.send(pcm)  # all at once: nothing is dropped (max_lag_s=30), and every block is the client's audio
            messages = receive_until(ws, lambda m: of_type("block")(m) and m["index"] == 9)
            ws.send(json.dumps({"type": "stop"}))
            messages += closed_after(ws)
    assert messages[-1]["type"] == "ended" and messages[-1]["reason"] == "stop"
    blocks = [m for m in messages if of_type("block")(m)][:10]
    clock = BlockClock(pipe)
    assert [b["audio_sample"] for b in blocks] == [
        sum(clock.samples(i) for i in range(b)) + clock.first_frame_samples(b) for b in range(10)]
    assert blocks[-1]["dropped_blocks"] == 0 and blocks[-1]["rtf"] > 0
    frames, _, audio = decode(b"".join(m for m in messages if isinstance(m, bytes)))
    # The same pipeline fed the same chunks offline: the same frames (up to H.264), not another seed's.
    wav = pcm16_to_float(pcm)
    chunks, at = [], 0
    for b in range(10):
        chunks.append(wav[at : at + clock.samples(b)])
        at += clock.samples(b)
    image = media.read_image(REFERENCE, size=pipe.components.resolution)
    offline = torch.cat([f for _, f in pipe.stream(image, iter(chunks))])
    other_seed = torch.cat([f for _, f in pipe.stream(image, iter(chunks), seed=1)])
    served = cells(frames[: len(offline)], 8)
    error = np.abs(served - media.to_uint8(offline).numpy()).mean()
    control = np.abs(served - media.to_uint8(other_seed).numpy()).mean()
    assert len(frames) >= 30 and error < 3 and control > 10 * error, (error, control)
    # The avatar speaks with the client's voice.
    heard = audio[::3][1600 : at - 1600]
    assert np.corrcoef(heard, wav[1600 : 1600 + len(heard)])[0, 1] > 0.9


@pytest.fixture(scope="module")
def tpp_group(tiny_checkpoint):
    """engine=tpp behind the server: 2 DiT ranks + the decoding rank (gloo, one thread each), started once."""
    from liveavatar.serving.tpp_group import TPPGroup

    group = TPPGroup.launch(serve_config(f"checkpoint={tiny_checkpoint}", "engine=tpp"))
    yield group
    group.close()
    assert all(p.poll() is not None for p in group._procs)  # no rank outlives the server


def served_frames(ws_url, pcm, blocks=10):
    """One session: all of ``pcm`` at once, ``blocks`` blocks back, then stop. Returns (frames, block messages)."""
    with connect(ws_url) as ws:
        start(ws)
        assert receive(ws)["type"] == "started"
        ws.send(pcm)
        messages = receive_until(ws, lambda m: of_type("block")(m) and m["index"] == blocks - 1, timeout=30)
        ws.send(json.dumps({"type": "stop"}))
        messages += closed_after(ws)
    assert messages[-1]["type"] == "ended" and messages[-1]["reason"] == "stop"
    frames, _, _ = decode(b"".join(m for m in messages if isinstance(m, bytes)))
    return frames, [m for m in messages if of_type("block")(m)]


def test_tpp_serves_the_sequential_engines_frames_and_each_session_starts_afresh(pipes, tpp_group):
    """The same audio through the TPP ranks: the frames the sequential engine serves (up to H.264, and far from
    another seed's), twice: the second session starts from a fresh cache on every rank, so it is the first again."""
    pipe, pcm = pipes("sequential"), speech_pcm(1.2)
    with serving(tpp_group, "server.max_lag_s=30", "server.crf=4") as (ws_url, http_url, _):
        first, blocks = served_frames(ws_url, pcm)
        second, _ = served_frames(ws_url, pcm)
        assert status(http_url)["tpp"] == {"ranks": 3, "ranks_in_session": 0, "failed": None}
    assert [b["index"] for b in blocks[:10]] == list(range(10)) and blocks[-1]["dropped_blocks"] == 0
    assert 0 < blocks[-1]["rtf"] and blocks[0]["first_frame_s"] > 0
    np.testing.assert_array_equal(first[:30], second[:30])
    clock, wav = BlockClock(pipe), pcm16_to_float(pcm)
    bounds = np.cumsum([0] + [clock.samples(b) for b in range(10)])
    chunks = [wav[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    image = media.read_image(REFERENCE, size=pipe.components.resolution)
    offline = torch.cat([f for _, f in pipe.stream(image, iter(chunks))])
    other_seed = torch.cat([f for _, f in pipe.stream(image, iter(chunks), seed=1)])
    served = cells(first[: len(offline)], 8)
    error = np.abs(served - media.to_uint8(offline).numpy()).mean()
    control = np.abs(served - media.to_uint8(other_seed).numpy()).mean()
    assert len(first) >= 30 and error < 3 and control > 10 * error, (error, control)


def test_tpp_a_client_that_disconnects_mid_stream_frees_the_ranks_for_the_next(tpp_group):
    with serving(tpp_group, "server.max_lag_s=30") as (ws_url, http_url, _), connect(ws_url) as a, \
            connect(ws_url) as b:
        start(a)
        assert receive(a)["type"] == "started"
        a.send(speech_pcm(4.0))  # 33 blocks of work queued for the ranks
        receive_until(a, of_type("block"))
        start(b)
        assert receive(b)["type"] == "queued"
        assert status(http_url)["tpp"]["ranks_in_session"] == 3
        a.socket.shutdown(socket.SHUT_RDWR)  # gone without a goodbye
        t0 = time.monotonic()
        assert receive(b, timeout=5)["type"] == "started"
        freed = time.monotonic() - t0
        b.send(speech_pcm(0.5))
        first = receive_until(b, of_type("block"))[-1]
        assert first["index"] == 0 and first["audio_sample"] is not None
        assert freed < 2, freed  # the rest of a's queued blocks passed the ranks without compute
        b.close()
        deadline = time.monotonic() + 5
        while status(http_url)["active"] or status(http_url)["tpp"]["ranks_in_session"]:
            assert time.monotonic() < deadline, status(http_url)
            time.sleep(0.05)
        assert status(http_url)["live_streams"] == 0


def test_audio_far_ahead_of_the_engine_is_dropped_in_whole_blocks_and_counted(live_pipe):
    with serving(live_pipe, "server.max_lag_s=0.24") as (ws_url, _, _), connect(ws_url) as ws:
        start(ws)
        assert receive(ws)["type"] == "started"
        ws.send(speech_pcm(2.0))  # 2 s at once: at most 0.24 s may wait behind the block being made
        first = receive_until(ws, of_type("block"))[-1]
    block = 1920  # samples under one block of the tiny preset (3 frames at 25 fps)
    assert first["dropped_blocks"] >= 12 and first["dropped_frames"] == 3 * first["dropped_blocks"]
    # The block made is the newest audio but the allowed lag, not the oldest: the delay stays bounded.
    assert first["audio_sample"] == first["dropped_blocks"] * block + 640
    assert first["backlog_s"] <= 0.24 + 1e-9


def test_a_client_too_slow_for_the_video_gets_whole_fragments_that_still_play_in_order(pipes):
    """A client that reads nothing (a small receive buffer, its library's queue of 2 messages) while the server
    makes a 1.2 s session: old fragments are dropped, counted for the page, and what arrives is init + runs of whole
    blocks that decode to the pipeline's frames of those blocks, in order."""
    pipe, pcm = pipes("sequential"), speech_pcm(1.2)
    with serving(pipes, "server.max_lag_s=30", "server.crf=4", "server.max_outgoing_s=0.25",
                 "server.min_side=512", "server.max_session_s=1.2") as (ws_url, http_url, _):
        host, port = ws_url.split("//")[1].split("/")[0].split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        with connect(ws_url, sock=sock, max_queue=2) as ws:
            start(ws)
            assert receive(ws)["type"] == "started"
            ws.send(pcm)
            deadline = time.monotonic() + 30
            while status(http_url)["served"] < 1 or status(http_url)["active"]:  # the whole session made, unread
                assert time.monotonic() < deadline
                time.sleep(0.05)
            messages = closed_after(ws)
    ended = messages[-1]
    assert ended["type"] == "ended" and ended["reason"] == "limit"
    blocks = [m for m in messages if of_type("block")(m)]
    kept = [b["index"] for b in blocks]
    assert kept == sorted(kept) and 0 < len(kept) < 10 and ended["unsent_blocks"] == 10 - len(kept)
    assert ended["unsent_frames"] == 3 * ended["unsent_blocks"]
    frames, times, _ = decode(b"".join(m for m in messages if isinstance(m, bytes)))
    assert np.allclose(times, [b["media_start"] + j / 25 for b in blocks for j in range(b["frames"])])
    clock, wav = BlockClock(pipe), pcm16_to_float(pcm)
    bounds = np.cumsum([0] + [clock.samples(b) for b in range(10)])
    image = media.read_image(REFERENCE, size=pipe.components.resolution)
    offline = [f for _, f in pipe.stream(image, iter(wav[a:b] for a, b in zip(bounds[:-1], bounds[1:])))]
    given = media.to_uint8(torch.cat([offline[k] for k in kept])).numpy()
    assert np.abs(cells(frames[: len(given)], 16) - given).mean() < 3  # no frame refers to one left out


def test_an_uploaded_image_is_served_until_the_session_limit(live_pipe):
    url = "data:image/png;base64," + base64.b64encode(REFERENCE.read_bytes()).decode()
    with serving(live_pipe, "server.max_session_s=0.5") as (ws_url, _, _), connect(ws_url) as ws:
        ws.send(json.dumps({"type": "start", "image_data": url}))
        assert receive(ws)["type"] == "started"
        messages = closed_after(ws)  # the client sends nothing: silence, and the avatar still moves
    assert messages[-1]["type"] == "ended" and messages[-1]["reason"] == "limit"
    blocks = [m for m in messages if of_type("block")(m)]
    assert blocks and all(b["audio_sample"] is None for b in blocks) and blocks[-1]["silent_blocks"] == len(blocks)
    frames, _, _ = decode(b"".join(m for m in messages if isinstance(m, bytes)))
    assert len(frames) == sum(b["frames"] for b in blocks) >= 12


def test_second_client_waits_with_its_position_then_is_served_and_a_third_is_refused(pipes):
    with serving(pipes, "server.max_queue=1") as (ws_url, http_url, _):
        with connect(ws_url) as a, connect(ws_url) as b, connect(ws_url) as c:
            start(a)
            assert receive(a)["type"] == "started"
            receive_until(a, of_type("block"))
            start(b)
            assert receive(b) == {"type": "queued", "position": 1, "waiting": 1}
            start(c)
            refused = closed_after(c)
            assert [m["type"] for m in refused] == ["error"] and "server.max_queue=1" in refused[0]["message"]
            assert c.close_code == 1013
            assert status(http_url)["waiting"] == 1
            a.send(json.dumps({"type": "stop"}))
            assert closed_after(a)[-1]["type"] == "ended"
            assert receive(b)["type"] == "started"
            receive_until(b, of_type("block"))


def test_a_client_that_disconnects_mid_stream_frees_the_model_for_the_next(pipes):
    with serving(pipes) as (ws_url, http_url, _), connect(ws_url) as a, connect(ws_url) as b:
        start(a)
        assert receive(a)["type"] == "started"
        a.send(speech_pcm(0.5))
        receive_until(a, of_type("block"))
        start(b)
        assert receive(b)["type"] == "queued"
        assert status(http_url)["live_streams"] == 1
        a.socket.shutdown(socket.SHUT_RDWR)  # gone without a goodbye
        t0 = time.monotonic()
        assert receive(b, timeout=5)["type"] == "started"
        receive_until(b, of_type("block"))
        assert time.monotonic() - t0 < 3
        # a's stream (its KV cache) is gone; only b's lives.
        assert status(http_url)["live_streams"] == 1 and status(http_url)["served"] == 2
        b.close()
        deadline = time.monotonic() + 5
        while status(http_url)["active"] or status(http_url)["live_streams"]:
            assert time.monotonic() < deadline, status(http_url)
            time.sleep(0.05)


def test_garbage_on_the_socket_gets_one_error_and_the_server_keeps_serving(pipes):
    garbage_first = [
        "hello",                                                    # not JSON
        b"\x00\x01\x02",                                            # audio before a start
        json.dumps({"type": "dance"}),                              # not a start
        json.dumps({"type": "start", "image": "../../etc/passwd"}),  # not one of the server's images
        json.dumps({"type": "start", "image_data": "data:image/png;base64,AAAA"}),  # not an image
    ]
    garbage_during = [b"\x01\x02\x03", "{]", json.dumps({"type": "dance"})]
    with serving(pipes) as (ws_url, _, _):
        for junk in garbage_first:
            with connect(ws_url) as ws:
                ws.send(junk)
                errors = closed_after(ws)
                assert [m["type"] for m in errors] == ["error"], (junk, errors)
                assert "\n" not in errors[0]["message"]
        for junk in garbage_during:
            with connect(ws_url) as ws:
                start(ws)
                receive_until(ws, of_type("block"))
                ws.send(junk)
                after = [m for m in closed_after(ws) if isinstance(m, dict) and m["type"] != "block"]
                assert [m["type"] for m in after] == ["error"], (junk, after)
        with connect(ws_url) as ws:  # still serving
            start(ws)
            assert receive(ws)["type"] == "started"
            receive_until(ws, of_type("block"))


# ------------------------------------------------------------------------------------------------ the CLI


def run_serve(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, str(ROOT / "serve.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_cli_refusals_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        for args, words in [(["engine=tpp", "engine.history=clean"], "engine.history"),
                            ([f"server.port={port}"], f"server.port={port}"),
                            ([f"server.images={tmp_path}/none"], "server.images"),
                            (["model.dit.listening=true"], "model.dit.listening")]:
            result = run_serve(*args, f"hydra.run.dir={tmp_path}/hydra")
            assert result.returncode == 2, result
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr


def test_tpp_settings_the_ranks_refuse_are_one_line_and_leave_no_rank_behind(tiny_checkpoint, capfd):
    """Refused by the ranks once loaded (the sink switches before the pipeline is full): one line for the server to
    print (``serve.py`` prints a UserError as ``error: ...``, exit status 2), nothing from the ranks, every rank
    gone."""
    from liveavatar.serving.tpp_group import TPPGroup

    group = TPPGroup(serve_config(f"checkpoint={tiny_checkpoint}", "engine=tpp", "engine.sink_switch_block=1"))
    with pytest.raises(UserError) as refused:
        group._start()
    assert str(refused.value).startswith("engine=tpp cannot switch the sink before block 2") and "\n" not in str(
        refused.value)
    assert all(p.poll() is not None for p in group._procs)
    assert capfd.readouterr().err == ""  # the ranks' stderr is this process's: no traceback, no second line


def test_tpp_needs_a_gpu_per_rank():
    from liveavatar.engine.tpp import Layout
    from liveavatar.serving.tpp_group import check_devices

    check_devices(Layout(4), "cuda", 5)
    check_devices(Layout(4), "cpu", 0)
    with pytest.raises(UserError, match=r"4 steps runs 5 ranks \(4 DiT ranks \+ 1 decoding rank\), one GPU each; 2 "):
        check_devices(Layout(4), "cuda", 2)
    with pytest.raises(UserError, match="runs 4 ranks"):
        check_devices(Layout(4, decode_on_last=True), "cuda", 3)


@pytest.mark.slow
def test_cli_prints_the_url_and_serves_the_page(tmp_path, tiny_checkpoint):
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "server.port=0", f"checkpoint={tiny_checkpoint}",
                             f"hydra.run.dir={tmp_path}/hydra"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line[line.index("http://") :].split()[0]
        import urllib.request

        with urllib.request.urlopen(url, timeout=20) as r:
            assert b"<video" in r.read()
        assert status(url)["engine"] == "sequential"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------------------------------------ the browser


PAGE_STATE = """() => { const v = document.getElementById('avatar'); const l = window.liveavatar;
    return {state: l.state, error: l.error, time: v.currentTime, paused: v.paused, ready: v.readyState,
            buffered: v.buffered.length ? [v.buffered.start(0), v.buffered.end(v.buffered.length - 1)] : null,
            shown: l.framesShown, blocks: l.blocks, sent: l.samplesSent, g2g: l.g2g.length}; }"""


SHOWN_AND_TIME = "[window.liveavatar.framesShown, document.getElementById('avatar').currentTime]"


def wait_for(page, condition: str, timeout_s: float):
    """``page.wait_for_function``, failing with the page's state instead of a bare timeout."""
    try:
        page.wait_for_function(condition, timeout=timeout_s * 1000)
    except Exception as err:  # playwright's TimeoutError
        pytest.fail(f"waited {timeout_s} s for {condition}: {type(err).__name__}; page: {page.evaluate(PAGE_STATE)}")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                                                   "chromium; .ci/run installs it)")
def test_browser_talks_to_the_avatar(pipes, tmp_path, capsys):
    playwright = pytest.importorskip("playwright.sync_api")
    # The fake microphone plays this file (Chromium loops it).
    media.write_wav(tmp_path / "mic.wav", media.read_audio(SPEECH), 16000)
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}", "--autoplay-policy=no-user-gesture-required"]
    with serving(pipes) as (_, http_url, _), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(http_url)
            page.wait_for_function("document.getElementById('gallery').value === 'reference.png'")
            page.click("#start")
            wait_for(page, "window.liveavatar.state === 'streaming'", 15)
            first = page.evaluate(SHOWN_AND_TIME)
            t0 = first[1]
            wait_for(page, "document.getElementById('avatar').currentTime > 2.5 && window.liveavatar.g2g.length >= 5", 30)
            live = page.evaluate("""() => { const v = document.getElementById('avatar'); const l = window.liveavatar;
                const q = v.getVideoPlaybackQuality();
                return {state: l.state, error: l.error, time: v.currentTime, paused: v.paused,
                        decoded: q.totalVideoFrames, shown: l.framesShown, ttff: l.ttff, g2g: l.g2g,
                        sent: l.samplesSent, server: l.server}; }""")
            page.click("#stop")
            # Start again on the same page: a new session, a new stream into the same <video>.
            wait_for(page, "!document.getElementById('start').disabled", 10)
            page.click("#start")
            wait_for(page, "window.liveavatar.state === 'streaming' && window.liveavatar.framesShown > 5", 30)
            again_start = page.evaluate(SHOWN_AND_TIME)
            wait_for(page, f"window.liveavatar.framesShown > {again_start[0] + 25} "
                           f"&& document.getElementById('avatar').currentTime > {again_start[1] + 1}", 30)
            again = page.evaluate(SHOWN_AND_TIME)
        finally:
            browser.close()
    # Each frame presented is counted once (the second session too), about 25 per second of video played; counted
    # between two readings, since a session's first fragment need not start the video at time 0.
    for (shown0, time0), (shown1, time1) in ((first, (live["shown"], live["time"])), (again_start, again)):
        assert 0.7 < (shown1 - shown0) / ((time1 - time0) * 25) < 1.3, (shown0, time0, shown1, time1)
    assert not errors and live["error"] is None and live["state"] == "streaming"
    assert live["time"] > t0 + 2 and not live["paused"]
    assert live["decoded"] > 50 and live["shown"] > 50 and live["sent"] > 16000
    server = live["server"]
    assert server["audio_sample"] is not None  # the microphone's audio drives the blocks, not the silence filler
    g2g = sorted(live["g2g"])[len(live["g2g"]) // 2]
    assert 0 < live["ttff"] < 5 and 0 < g2g < 3
    with capsys.disabled():
        print(f"\nbrowser: time to first frame {live['ttff'] * 1000:.0f} ms, glass-to-glass median {g2g * 1000:.0f} ms "
              f"({len(live['g2g'])} blocks), real-time factor {server['rtf']:.2f}, "
              f"frames dropped {server['dropped_frames']}, silent blocks {server['silent_blocks']}")
