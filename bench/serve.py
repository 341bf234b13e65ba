"""Live serving benchmark: glass-to-glass latency and sustained real-time factor of ``serve.py``'s app, measured
end to end in one run: the server on this machine, headless Chromium (Debian's ``/usr/bin/chromium``) talking into
it through a fake microphone that plays a speech file in a loop.

    python bench/serve.py                                   # the tiny preset (random weights), 4 steps, on the CPU
    python bench/serve.py --seconds 60 -- engine=stream_batch denoise.steps=[1000,500]
    python bench/serve.py --client socket -- engine=tpp denoise.steps=[1000,500]   # 2 DiT ranks + decoding rank
    python bench/serve.py --screenshot docs/serve.png -- checkpoint=outputs/train/toy_df/model ...

Everything after ``--`` is a ``conf/serve.yaml`` override. The figures, over ``--seconds`` after ``--warmup``:

* ``glass_to_glass_ms`` (median, p90): for the first frame of every block, the time from the page having sent the
  audio under that frame (the end of it) to the frame being presented (``requestVideoFrameCallback``'s
  expected display time), both on the page's clock;
* ``first_frame_ms``: from the server starting the session to the first frame presented;
* ``rtf``: the server's compute (model, decode, encode) per second of video over the window (below 1: keeps up);
  with ``engine=tpp`` the slowest stage's (a DiT rank's forward, the decoding rank's decode, or the server's
  encode) per block, the pipeline's pace; ``video_per_wall``: seconds of video played per wall-clock second (1.0
  when live);
* ``dropped_frames`` (audio dropped because the server fell behind), ``silent_blocks`` (audio late), the
  player's dropped frames.

``--client socket`` (no browser): a Python WebSocket client sends the file in real time; its latency is to the
arrival of the block's fragment (no decode, no display). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from liveavatar import media  # noqa: E402
from liveavatar.serving.app import create_app  # noqa: E402
from liveavatar.serving.server import BackgroundServer, check_servable, load, settings_from_config  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SPEECH = ROOT / "data/example/speech.wav"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def sustained(before: dict, after: dict) -> dict:
    """Server figures over the window between two block messages (each carries cumulative ``rtf``, ``video_s``)."""
    video = after["video_s"] - before["video_s"]
    busy = after["rtf"] * after["video_s"] - before["rtf"] * before["video_s"]
    return {"rtf": busy / video if video > 0 else None,
            "dropped_frames": after["dropped_frames"] - before["dropped_frames"],
            "silent_blocks": after["silent_blocks"] - before["silent_blocks"]}


PAGE_FIGURES = """() => { const v = document.getElementById('avatar'); const l = window.liveavatar;
  const q = v.getVideoPlaybackQuality();
  return {state: l.state, error: l.error, time: v.currentTime, ttff: l.ttff, g2g: l.g2g.length,
          g2g_all: l.g2g, server: l.server, player_dropped: q.droppedVideoFrames, decoded: q.totalVideoFrames}; }"""


def run_browser(url: str, args) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        mic = Path(tmp) / "mic.wav"
        media.write_wav(mic, media.read_audio(args.audio), 16000)
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 540})
            page.goto(url)
            page.wait_for_function("document.getElementById('gallery').value !== ''")
            if args.image:
                page.select_option("#gallery", args.image)
            page.click("#start")
            page.wait_for_function("window.liveavatar.state === 'streaming' && window.liveavatar.ttff !== null",
                                   timeout=60000)
            time.sleep(args.warmup)
            before, t0 = page.evaluate(PAGE_FIGURES), time.monotonic()
            time.sleep(args.seconds)
            after, wall = page.evaluate(PAGE_FIGURES), time.monotonic() - t0
            if args.screenshot:
                Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.screenshot)
            page.click("#stop")
        finally:
            browser.close()
    if after["error"]:
        sys.exit(f"bench/serve.py: the page failed: {after['error']}")
    window = after["g2g_all"][before["g2g"]:]
    return {"client": "browser", "first_frame_ms": after["ttff"] * 1000, "g2g": window,
            "video_per_wall": (after["time"] - before["time"]) / wall,
            "player_dropped_frames": after["player_dropped"] - before["player_dropped"],
            **sustained(before["server"], after["server"]), "server": after["server"]}


def run_socket(url: str, args) -> dict:
    """No browser: send the audio in real time, time each block's fragment's arrival."""
    from websockets.sync.client import connect

    wav = media.read_audio(args.audio)
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2")
    sent_at: list[tuple[int, float]] = []
    stop = threading.Event()
    with connect(url.replace("http://", "ws://") + "ws", max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "image": args.image or "reference.png"}))
        started = json.loads(ws.recv())
        t_start = time.perf_counter()

        def feed():
            n, chunk, t = 0, 640, time.perf_counter()
            while not stop.is_set():
                i = n % len(pcm)
                piece = pcm[i : i + chunk]
                ws.send(piece.tobytes())
                n += len(piece)
                sent_at.append((n, time.perf_counter()))
                t += len(piece) / 16000
                time.sleep(max(0.0, t - time.perf_counter()))

        threading.Thread(target=feed, daemon=True).start()
        arrived, first, blocks = None, None, []
        t_end = t_start + args.warmup + args.seconds
        while time.perf_counter() < t_end:
            message = ws.recv()
            now = time.perf_counter()
            if isinstance(message, bytes):
                arrived = now
                continue
            m = json.loads(message)
            if m["type"] == "block":
                first = first if first is not None else now - t_start
                blocks.append((now, arrived, m))
        stop.set()
        ws.send(json.dumps({"type": "stop"}))
    assert started["type"] == "started", started
    in_window = [(t, a, m) for t, a, m in blocks if t >= t_start + args.warmup]
    g2g = []
    for _, a, m in in_window:
        if m["audio_sample"] is not None:
            sent = next((t for n, t in sent_at if n >= m["audio_sample"]), None)
            if sent is not None:
                g2g.append(a - sent)
    before, after = in_window[0][2], in_window[-1][2]
    wall = in_window[-1][0] - in_window[0][0]
    return {"client": "socket", "first_frame_ms": first * 1000, "g2g": g2g,
            "video_per_wall": (after["video_s"] - before["video_s"]) / wall if wall > 0 else None,
            **sustained(before, after), "server": after}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds streamed before the window")
    p.add_argument("--client", choices=["browser", "socket"], default="browser" if CHROMIUM.exists() else "socket")
    p.add_argument("--audio", default=str(SPEECH), help="what the microphone plays (looped)")
    p.add_argument("--image", default=None, help="the gallery image to choose (default: the server's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--screenshot", default=None, help="save the page at the end of the window here (png)")
    p.add_argument("overrides", nargs="*", help="conf/serve.yaml overrides, after --")
    args = p.parse_args()
    if args.client == "browser" and not CHROMIUM.exists():
        sys.exit("bench/serve.py: --client browser needs /usr/bin/chromium (apt-get install chromium)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", args.overrides)
    check_servable(cfg)
    pipe = load(cfg)  # engine=tpp: starts the ranks (engine.threads_per_rank threads each on the CPU)
    try:
        app = create_app(pipe, settings_from_config(cfg))
        with BackgroundServer(app) as url:
            measured = (run_browser if args.client == "browser" else run_socket)(url, args)
    finally:
        if hasattr(pipe, "close"):
            pipe.close()
    g2g = [x * 1000 for x in measured.pop("g2g")]
    server = measured.pop("server")
    result = {
        "client": measured["client"], "preset": cfg.model.name, "engine": pipe.engine,
        "steps": len(cfg.denoise.steps), "device": str(pipe.device),
        "threads": cfg.engine.threads_per_rank if pipe.engine == "tpp" else torch.get_num_threads(),
        "ranks": getattr(pipe, "world", None), "load_average": round(os.getloadavg()[0], 2),
        "seconds": args.seconds, "blocks_measured": len(g2g),
        "glass_to_glass_ms": round(statistics.median(g2g), 1) if g2g else None,
        "glass_to_glass_p90_ms": round(percentile(g2g, 0.9), 1) if g2g else None,
        "first_frame_ms": round(measured["first_frame_ms"], 1),
        "server_first_frame_ms": round(server["first_frame_s"] * 1000, 1),
        "rtf": round(measured["rtf"], 3) if measured["rtf"] is not None else None,
        "video_per_wall": round(measured["video_per_wall"], 3) if measured["video_per_wall"] else None,
        "dropped_frames": measured["dropped_frames"], "silent_blocks": measured["silent_blocks"],
        "player_dropped_frames": measured.get("player_dropped_frames"),
    }
    print(f"{result['client']} client, {result['preset']} ({result['engine']}, {result['steps']} steps, "
          f"{result['device']}): glass-to-glass median {result['glass_to_glass_ms']} ms "
          f"(p90 {result['glass_to_glass_p90_ms']} ms, {len(g2g)} blocks), first frame {result['first_frame_ms']} ms")
    print(f"real-time factor {result['rtf']} over {args.seconds:g} s, video per wall second "
          f"{result['video_per_wall']}, dropped frames {result['dropped_frames']}, silent blocks "
          f"{result['silent_blocks']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
