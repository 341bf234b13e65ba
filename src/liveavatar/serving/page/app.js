// The browser side of serve.py: the microphone to the server as 16 kHz PCM over a WebSocket, the avatar's
// fragmented MP4 from the server into Media Source Extensions, and the live figures. The protocol is described in
// liveavatar/serving/protocol.py.
"use strict";

// Video arrives a block at a time: play one block (+ jitter) behind the newest frame received, so that the next
// block is there before the playhead runs out; further behind than MAX_LAG_S (a stall, a busy tab): jump forward.
const JITTER_S = 0.08;
let LEAD_S = 0.2, MAX_LAG_S = 0.8;  // set from the block duration when the session starts

const $ = (id) => document.getElementById(id);
const video = $("avatar");

// Everything measured, readable by tests and benchmarks as window.liveavatar.
const live = window.liveavatar = {
  state: "idle",          // idle | connecting | queued | streaming | ended | error
  error: null,
  position: null,         // place in the queue while waiting
  startedAt: null,        // performance.now() when the server started the session
  ttff: null,             // seconds from then to the first frame shown
  framesShown: 0,
  g2g: [],                // glass-to-glass latencies (s): first frame of a block shown - its audio sent
  server: {},             // the figures of the last block message
  blocks: 0,
  bytes: 0,
  samplesSent: 0,
};

let ws = null, mic = null, micSource = null, audioCtx = null, capture = null, mediaSource = null, sourceBuffer = null;
let pending = [];         // fragments waiting for the SourceBuffer
let blocks = [];          // block messages whose first frame has not been shown yet
let sendLog = [];         // [samples sent so far, performance.now()] per chunk sent
let fps = 25, upload = null, ticker = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// ---------------------------------------------------------------------------------------------- reference image

async function loadGallery() {
  const r = await fetch("/api/images");
  const { images, default: first } = await r.json();
  for (const name of images) {
    const o = document.createElement("option");
    o.value = o.textContent = name;
    $("gallery").appendChild(o);
  }
  if (first) $("gallery").value = first;
  showPreview();
}

function showPreview() {
  $("preview").src = upload || ("/api/images/" + encodeURIComponent($("gallery").value));
}

$("gallery").addEventListener("change", () => { upload = null; $("upload").value = ""; showPreview(); });
$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { upload = reader.result; showPreview(); };
  reader.readAsDataURL(file);
});

// ---------------------------------------------------------------------------------------------- microphone

// One AudioContext (and its worklet module) for the page's life: each session only adds a source and a capture
// node to it, and Stop removes them (a context closed and made again at once can fail to load the module).
async function audioContext() {
  if (!audioCtx) {
    let ctx;
    try {
      ctx = new AudioContext({ sampleRate: 16000 });
    } catch (e) {
      ctx = new AudioContext();  // the worklet resamples
    }
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    audioCtx = ctx;  // only once the module is in
  }
  await audioCtx.resume();
  return audioCtx;
}

async function startMicrophone() {
  mic = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true },
  });
  const ctx = await audioContext();
  const source = micSource = ctx.createMediaStreamSource(mic);
  const node = capture = new AudioWorkletNode(ctx, "pcm16-capture",
                                              { processorOptions: { targetRate: 16000, chunk: 640 } });
  const silent = ctx.createGain();
  silent.gain.value = 0;  // the graph must reach the destination to be processed; nothing is heard
  source.connect(node).connect(silent).connect(ctx.destination);
  node.port.onmessage = (e) => {
    // (a stopped microphone's last chunks are not the new session's audio)
    if (node !== capture || !ws || ws.readyState !== WebSocket.OPEN || live.state !== "streaming") return;
    ws.send(e.data);
    live.samplesSent += e.data.byteLength / 2;
    sendLog.push([live.samplesSent, performance.now()]);
    if (sendLog.length > 2000) sendLog = sendLog.slice(-1000);
  };
}

function stopMicrophone() {
  if (micSource) micSource.disconnect();
  if (capture) capture.disconnect();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (audioCtx) audioCtx.suspend();
  mic = micSource = capture = null;
}

// When the client sample `sample` had been sent (null if no longer known).
function sentAt(sample) {
  let lo = 0, hi = sendLog.length - 1;
  if (hi < 0 || sendLog[hi][0] < sample || sendLog[0][0] - 640 > sample) return null;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sendLog[mid][0] >= sample) hi = mid; else lo = mid + 1;
  }
  return sendLog[lo][1];
}

// ---------------------------------------------------------------------------------------------- playback

function startPlayer(mime) {
  if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
    throw new Error("this browser cannot play " + mime + " through Media Source Extensions");
  }
  sourceBuffer = null;  // the last session's buffer leaves with its MediaSource: nothing more goes into it
  const ms = mediaSource = new MediaSource();
  video.src = URL.createObjectURL(ms);
  video.muted = $("mute").checked;
  ms.addEventListener("sourceopen", () => {
    if (ms !== mediaSource) return;
    const sb = sourceBuffer = ms.addSourceBuffer(mime);
    sb.mode = "segments";
    sb.addEventListener("updateend", () => { if (sb === sourceBuffer) { startPlayback(); pump(); } });
    pump();
  }, { once: true });
}

function pump() {
  if (!sourceBuffer || sourceBuffer.updating || !pending.length) return;
  try {
    sourceBuffer.appendBuffer(pending[0]);
    pending.shift();
  } catch (e) {
    if (e.name === "QuotaExceededError" && video.currentTime > 10) {
      sourceBuffer.remove(0, video.currentTime - 5);  // an hours-long session: forget what was played
    } else {
      fail("the player refused the stream: " + e.message);
    }
  }
}

function startPlayback() {
  const b = video.buffered;
  if (!video.paused || !b.length || b.end(b.length - 1) - b.start(0) < LEAD_S) return;
  video.currentTime = Math.max(b.start(0), b.end(b.length - 1) - LEAD_S);
  video.play().catch(() => { video.muted = true; return video.play(); }).catch(() => {});
}

// Keep the playhead near the newest frame: a live stream must not drift behind. Fragments the server dropped for a
// slow connection leave a gap in the timeline: at the end of a buffered range with a later one, jump to it.
function keepLive() {
  const b = video.buffered, t = video.currentTime;
  if (b.length) {
    const end = b.end(b.length - 1);
    if (end - t > MAX_LAG_S) video.currentTime = end - LEAD_S;
    else {
      for (let i = 0; i < b.length; i++) {
        const before = i === 0 ? -Infinity : b.end(i - 1);
        if (b.start(i) > t && t >= before - 1.5 / fps) { video.currentTime = b.start(i); break; }
      }
    }
  }
  const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  live.playerDropped = q ? q.droppedVideoFrames : null;
  live.decodedFrames = q ? q.totalVideoFrames : video.webkitDecodedFrameCount;
  live.currentTime = video.currentTime;
  showFigures();
}

function onFrame(now, meta) {
  live.framesShown++;
  const shownAt = meta.expectedDisplayTime || now;
  if (live.ttff === null && live.startedAt !== null) live.ttff = (shownAt - live.startedAt) / 1000;
  // The first frame of each block: how long after its audio was sent it is on screen.
  while (blocks.length && blocks[0].media_start <= meta.mediaTime + 0.5 / fps) {
    const b = blocks.shift();
    if (b.audio_sample === null || meta.mediaTime >= b.media_start + b.frames / fps) continue;  // silence, or skipped
    const sent = sentAt(b.audio_sample);
    if (sent !== null) live.g2g.push((shownAt - sent) / 1000);
    if (live.g2g.length > 1000) live.g2g.shift();
  }
  video.requestVideoFrameCallback(onFrame);
}

// ---------------------------------------------------------------------------------------------- the session

function fail(message) {
  live.state = "error";
  live.error = message;
  setStatus(message, true);
  stop(false);
}

function onMessage(event) {
  if (event.data instanceof ArrayBuffer) {
    live.bytes += event.data.byteLength;
    pending.push(event.data);
    pump();
    return;
  }
  const m = JSON.parse(event.data);
  if (m.type === "queued") {
    live.state = "queued";
    live.position = m.position;
    setStatus(`waiting for the model: place ${m.position} of ${m.waiting} in the queue`);
  } else if (m.type === "started") {
    live.state = "streaming";
    live.position = null;
    live.startedAt = performance.now();
    fps = m.fps;
    LEAD_S = m.block_frames / m.fps + JITTER_S;
    MAX_LAG_S = LEAD_S + 0.6;
    setStatus("live: speak, and the avatar answers");
    try { startPlayer(m.mime); } catch (e) { fail(e.message); }
  } else if (m.type === "block") {
    live.blocks++;
    live.server = m;
    blocks.push(m);
  } else if (m.type === "ended") {
    live.state = "ended";
    setStatus("ended (" + m.reason + ")");
    stop(false);
  } else if (m.type === "error") {
    fail(m.message);
  }
}

async function start() {
  $("start").disabled = true;
  $("stop").disabled = false;
  Object.assign(live, { state: "connecting", error: null, ttff: null, framesShown: 0, g2g: [], server: {},
                        blocks: 0, bytes: 0, samplesSent: 0, startedAt: null, position: null });
  pending = []; blocks = []; sendLog = [];
  setStatus("opening the microphone");
  try {
    await startMicrophone();
  } catch (e) {
    fail("no microphone: " + e.message);
    return;
  }
  setStatus("connecting");
  const socket = ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    const start = upload ? { type: "start", image_data: upload } : { type: "start", image: $("gallery").value };
    socket.send(JSON.stringify(start));
  };
  // A stopped session's socket may still deliver its last messages after Start was pressed again: only the
  // current socket speaks to the page.
  socket.onmessage = (e) => { if (socket === ws) onMessage(e); };
  socket.onclose = (e) => {
    if (socket !== ws) return;
    if (live.state === "streaming" || live.state === "queued" || live.state === "connecting") {
      fail("the server closed the connection" + (e.reason ? ": " + e.reason : ""));
    }
  };
  if (ticker) clearInterval(ticker);
  ticker = setInterval(keepLive, 200);
}

function stop(sendStop = true) {
  if (ws && ws.readyState === WebSocket.OPEN && sendStop) ws.send(JSON.stringify({ type: "stop" }));
  stopMicrophone();
  if (sendStop && live.state !== "error") { live.state = "ended"; setStatus("stopped"); }
  $("start").disabled = false;
  $("stop").disabled = true;
}

// ---------------------------------------------------------------------------------------------- figures

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1];
}

const ms = (s) => (s === null || s === undefined ? "-" : Math.round(s * 1000) + " ms");

function showFigures() {
  const s = live.server;
  $("f-queue").textContent = live.position === null ? "-" : String(live.position);
  $("f-ttff").textContent = live.ttff === null ? "-" : `${ms(live.ttff)} (server ${ms(s.first_frame_s)})`;
  $("f-rtf").textContent = s.rtf_recent === undefined ? "-" : `${s.rtf_recent.toFixed(2)} (all ${s.rtf.toFixed(2)})`;
  const last = live.g2g.length ? live.g2g[live.g2g.length - 1] : null;
  $("f-g2g").textContent = last === null ? "-" : `${ms(last)} (median ${ms(median(live.g2g))})`;
  $("f-dropped").textContent = s.dropped_frames === undefined ? "-" : `${s.dropped_frames} / ${live.playerDropped ?? "-"}`;
  $("f-unsent").textContent = s.unsent_frames === undefined ? "-" : String(s.unsent_frames);
  $("f-silent").textContent = s.silent_blocks === undefined ? "-" : String(s.silent_blocks);
  $("f-backlog").textContent = s.backlog_s === undefined ? "-" : ms(s.backlog_s);
  $("f-waiting").textContent = s.waiting === undefined ? "-" : String(s.waiting);
  $("f-played").textContent = video.currentTime ? video.currentTime.toFixed(1) + " s" : "-";
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => stop(true));
$("mute").addEventListener("change", () => { video.muted = $("mute").checked; });
video.addEventListener("waiting", keepLive);  // stalled, perhaps at a gap: jump it at once
if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) video.requestVideoFrameCallback(onFrame);
loadGallery();
