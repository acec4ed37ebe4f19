// vasa serve's page: a portrait and speech (an audio file or the microphone) go to the server over one WebSocket
// (protocol: vasa/inference/serve.py); the talking face comes back as JPEG frames with the audio they show, and
// is played here in sync. window.vasa holds the counts the browser test reads.

const $ = (id) => document.getElementById(id);
const FRAME = 1, AUDIO = 2;            // binary message kinds: uint8 kind + uint32 LE frame index + payload
const CHUNK_S = 0.1;                   // audio sent in 100 ms messages
const LEAD_S = 0.25;                   // playback starts this long after the first chunk arrives
const MAX_LATE = 3;                    // frames a picture may lag its audio (120 ms at 25 fps) before some are skipped

// frames: received; shown: drawn; skipped: overdue on a slow page; sent: audio samples sent at `rate`
const fresh = () => ({ frames: 0, shown: 0, skipped: 0, firstFrameMs: null, done: null, finished: false, error: null,
                       ready: null, sent: 0, rate: null });
const state = fresh();
window.vasa = state;
let info = null;
let current = null;                    // the running session
let stopping = false;                  // Stop was pressed

fetch("/info").then((r) => r.json()).then((i) => {
  info = i;
  $("notice-text").textContent = i.notice;
  $("model").textContent = `${i.generator} ${i.version}, model ${i.bundle_sha256.slice(0, 16)}; ` +
    `at most ${i.limits.max_audio_seconds} s of audio per session.`;
});

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function fail(message) {
  state.error = message;
  setStatus(`Error: ${message}`, true);
  finish();
}

function finish() {
  $("play-file").disabled = $("mic").disabled = false;
  $("stop").disabled = true;
  if (current) current.stopCapture();
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function toPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
  return out.buffer;
}

// A file's audio, mono, at a rate the server takes: the AudioContext's own when accepted, else 16 kHz.
async function decodeFile(file, ctx) {
  const decoded = await ctx.decodeAudioData(await file.arrayBuffer());
  let buffer = decoded;
  if (!info.sample_rates.includes(decoded.sampleRate)) {
    const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * 16000), 16000);
    const source = new AudioBufferSourceNode(offline, { buffer: decoded });
    source.connect(offline.destination);
    source.start();
    buffer = await offline.startRendering();
  }
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  return { samples: mono, rate: buffer.sampleRate };
}

class Session {
  constructor(mode, ctx, rate) {
    this.mode = mode;
    this.ctx = ctx;
    this.rate = rate;
    this.clicked = performance.now();
    this.t0 = null;                       // clock time of frame 0
    this.bitmaps = new Map();             // frame index -> ImageBitmap, until drawn
    this.next = 0;                        // next frame index to draw
    this.capture = null;
    this.canvas = $("video").getContext("2d");
    this.ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (event) => this.receive(event.data);
    this.ws.onclose = (event) => {
      const reason = event.reason ? `: ${event.reason}` : "";
      if (!state.done && !state.error) fail(`connection closed (${event.code}${reason})`);
    };
    requestAnimationFrame(() => this.draw());
  }

  now() {
    return this.ctx.state === "running" ? this.ctx.currentTime : performance.now() / 1000;
  }

  start(portrait) {
    const message = { type: "start", portrait, sample_rate: this.rate, format: "pcm_s16le", channels: 1 };
    const send = () => this.ws.send(JSON.stringify(message));
    if (this.ws.readyState === WebSocket.OPEN) send(); else this.ws.addEventListener("open", send, { once: true });
    return new Promise((resolve) => { this.onReady = resolve; });
  }

  sendAudio(samples) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(toPcm16(samples));
    state.sent += samples.length;
    state.rate = this.rate;
  }

  end() {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "end" }));
  }

  stopCapture() {
    if (this.capture) { this.capture(); this.capture = null; }
  }

  receive(data) {
    if (typeof data === "string") {
      const message = JSON.parse(data);
      if (message.type === "ready") {
        state.ready = message;
        $("video").width = message.width;
        $("video").height = message.height;
        setStatus(`Streaming (${message.notice})`);
        this.onReady(message);
      } else if (message.type === "done") {
        state.done = message;
        setStatus(`Received ${message.frames} frames (${message.audio_seconds} s of audio); playing.`);
      } else if (message.type === "error") {
        fail(message.message);
      }
      return;
    }
    const view = new DataView(data);
    const kind = view.getUint8(0), index = view.getUint32(1, true);
    if (kind === AUDIO) this.schedule(index, new Int16Array(data.slice(5)));
    if (kind === FRAME) {
      state.frames++;
      $("frames").textContent = state.frames;
      const jpeg = new Blob([data.slice(5)], { type: "image/jpeg" });
      createImageBitmap(jpeg).then((bitmap) => this.bitmaps.set(index, bitmap));
    }
  }

  // The audio of frames [index, ...): played (file mode) at frame index's time; a chunk that arrives late moves
  // the clock so that it plays whole (the picture waits with it).
  schedule(index, pcm) {
    const fps = state.ready.fps, now = this.now();
    if (this.t0 === null || this.t0 + index / fps < now + 0.05) this.t0 = now + LEAD_S - index / fps;
    if (this.mode !== "file" || this.ctx.state !== "running" || pcm.length === 0) return;
    const buffer = this.ctx.createBuffer(1, pcm.length, state.ready.sample_rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
    const source = new AudioBufferSourceNode(this.ctx, { buffer });
    source.connect(this.ctx.destination);
    source.start(this.t0 + index / fps);
  }

  draw() {
    if (this.t0 !== null && state.ready) {
      const due = Math.floor((this.now() - this.t0) * state.ready.fps);
      // One frame a tick: a frame a tick late is still drawn (display refresh outpaces 25 fps, so the picture
      // catches up); only frames more than MAX_LATE behind their audio are skipped.
      while (this.next < due - MAX_LATE && this.bitmaps.has(this.next)) {
        this.bitmaps.get(this.next).close();
        this.bitmaps.delete(this.next++);
        state.skipped++;
      }
      let latest = null;
      if (this.next <= due && this.bitmaps.has(this.next)) {
        latest = this.bitmaps.get(this.next);
        this.bitmaps.delete(this.next++);
      }
      if (latest) {
        state.shown++;
        this.canvas.drawImage(latest, 0, 0);
        latest.close();
        if (state.firstFrameMs === null) {
          state.firstFrameMs = Math.round(performance.now() - this.clicked);
          $("first-frame").textContent = state.firstFrameMs;
        }
        $("shown").textContent = state.shown;
      }
      if (state.done && this.next >= state.done.frames) {
        state.finished = true;
        const skipped = state.skipped ? ` (${state.skipped} skipped: the page was too slow)` : "";
        setStatus(`Done: ${state.shown} frames shown for ${state.done.audio_seconds} s of audio${skipped}.`);
        finish();
        return;
      }
    }
    if (!state.error) requestAnimationFrame(() => this.draw());
  }
}

async function begin(mode) {
  const portraitFile = $("portrait").files[0];
  if (!portraitFile) return fail("choose a portrait image first");
  if (mode === "file" && !$("audio").files[0]) return fail("choose an audio file first");
  if (!info) return fail("the server's /info has not loaded yet");
  Object.assign(state, fresh());
  $("frames").textContent = $("shown").textContent = "0";
  $("first-frame").textContent = "–";
  current = null;
  stopping = false;
  $("play-file").disabled = $("mic").disabled = true;
  $("stop").disabled = false;
  setStatus("Connecting…");
  const ctx = new AudioContext();                     // made in the click: allowed to play
  try {
    if (mode === "file") {
      const { samples, rate } = await decodeFile($("audio").files[0], ctx);
      current = new Session(mode, ctx, rate);
      await current.start(await base64(portraitFile));
      const step = Math.round(rate * CHUNK_S);
      for (let i = 0; i < samples.length; i += step) current.sendAudio(samples.subarray(i, i + step));
      current.end();
    } else {
      await startMicrophone(ctx, await base64(portraitFile));
    }
  } catch (err) {
    fail(String(err && err.message ? err.message : err));
  }
}

async function startMicrophone(ctx, portrait) {
  if (!info.sample_rates.includes(ctx.sampleRate)) {
    throw new Error(`the microphone runs at ${ctx.sampleRate} Hz, which the server does not take`);
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  await ctx.audioWorklet.addModule("/static/capture.js");
  current = new Session("mic", ctx, ctx.sampleRate);
  await current.start(portrait);
  const input = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "pcm-capture");
  const mute = new GainNode(ctx, { gain: 0 });        // pulls the worklet without playing the microphone back
  input.connect(node).connect(mute).connect(ctx.destination);
  const step = Math.round(ctx.sampleRate * CHUNK_S);
  let pending = [], count = 0;
  node.port.onmessage = (event) => {
    pending.push(event.data);
    count += event.data.length;
    if (count < step) return;
    const joined = new Float32Array(count);
    let offset = 0;
    for (const part of pending) { joined.set(part, offset); offset += part.length; }
    current.sendAudio(joined);
    pending = []; count = 0;
  };
  current.capture = () => {
    node.port.onmessage = null;
    input.disconnect();
    stream.getTracks().forEach((track) => track.stop());
  };
  setStatus("Listening: speak, then press Stop.");
  if (stopping) { current.stopCapture(); current.end(); }
}

$("play-file").addEventListener("click", () => begin("file"));
$("mic").addEventListener("click", () => begin("mic"));
$("stop").addEventListener("click", () => {
  stopping = true;                                    // a session still connecting ends as soon as it is ready
  $("stop").disabled = true;
  if (current && current.capture) {
    current.stopCapture();
    current.end();
  }
});
