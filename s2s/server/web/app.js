// The s2s web client: microphone in, replies out, over protocol v1 (PROTOCOL.md).
// Plain ES module: no build step, no CDN, works with no internet.

const FRAME_MS = 40; // microphone frames (the protocol takes 10-100 ms)
const SERVER_RATES = [8000, 16000, 22050, 24000, 44100, 48000];
const params = new URLSearchParams(location.search);

// What automation reads: finished turns, as the terminal client's `turn` lines.
const s2s = {
  state: "idle",
  turns: [],
  playedSamples: 0,
  receivedSamples: 0,
  staleFrames: 0, // audio frames that arrived for no reply (the server promises none)
  sampleRate: null,
  errors: [],
  sessionId: null,
};
window.s2s = s2s;

const ui = {
  status: document.querySelector("#status"),
  start: document.querySelector("#start"),
  stop: document.querySelector("#stop"),
  mute: document.querySelector("#mute"),
  conversation: document.querySelector("#conversation"),
  latency: document.querySelector("#latency"),
};

let context = null;
let socket = null;
let microphone = null;
let player = null;
let muted = false;
let sentSamples = 0;
const sendTimes = []; // [input samples sent so far, when]
const turns = new Map(); // turn_id -> the turn as it happens
let replyTurn = null; // the turn whose reply audio is arriving

function setState(state, detail = "") {
  s2s.state = state;
  ui.status.textContent = detail ? `${state}: ${detail}` : state;
  ui.status.dataset.state = state;
}

function turn(id) {
  if (!turns.has(id)) {
    turns.set(id, {
      id,
      user_text: "",
      assistant_text: "",
      voice_to_voice_ms: null,
      interrupted: false,
      speechEndAt: null,
      finished: false,
      view: null,
    });
  }
  return turns.get(id);
}

function view(t) {
  if (!t.view) {
    const row = document.createElement("li");
    row.className = "turn";
    row.innerHTML =
      '<p class="user"></p><p class="assistant"></p><p class="figures"></p>';
    ui.conversation.append(row);
    t.view = row;
  }
  t.view.querySelector(".user").textContent = t.user_text || "…";
  t.view.querySelector(".assistant").textContent = t.assistant_text;
  const figures = [];
  if (t.voice_to_voice_ms !== null) figures.push(`voice-to-voice ${Math.round(t.voice_to_voice_ms)} ms`);
  if (t.interrupted) figures.push("interrupted");
  t.view.querySelector(".figures").textContent = figures.join(" · ");
  t.view.scrollIntoView({ block: "end" });
}

function finish(t) {
  if (t.finished) return;
  t.finished = true;
  const { user_text, assistant_text, voice_to_voice_ms, interrupted } = t;
  s2s.turns.push({ turn_id: t.id, user_text, assistant_text, voice_to_voice_ms, interrupted });
  if (voice_to_voice_ms !== null) ui.latency.textContent = `last turn: ${Math.round(voice_to_voice_ms)} ms voice-to-voice`;
  view(t);
}

// When the input sample `index` left this page: the end of the user's speech, as sent.
function sentAt(index) {
  for (const [sent, at] of sendTimes) if (sent >= index) return at;
  return performance.now();
}

function onEvent(event) {
  switch (event.type) {
    case "ready":
      s2s.sessionId = event.session_id;
      setState("listening");
      break;
    case "speech_started":
      turn(event.turn_id);
      setState("hearing you");
      break;
    case "speech_stopped":
      turn(event.turn_id).speechEndAt = sentAt(event.sample_index);
      setState("thinking");
      break;
    case "transcript": {
      const t = turn(event.turn_id);
      t.user_text = event.text;
      view(t);
      break;
    }
    case "reply_text": {
      const t = turn(event.turn_id);
      if (event.text) t.assistant_text = t.assistant_text ? `${t.assistant_text} ${event.text}` : event.text;
      view(t);
      break;
    }
    case "reply_audio_start":
      replyTurn = turn(event.turn_id);
      setState("speaking");
      break;
    case "reply_audio_end":
      if (replyTurn && replyTurn.id === event.turn_id) finish(replyTurn);
      break;
    case "interrupted": {
      const t = turn(event.turn_id);
      t.interrupted = true;
      player.port.postMessage({ type: "flush", turn: event.turn_id });
      if (replyTurn && replyTurn.id === event.turn_id) replyTurn = null;
      finish(t);
      setState("listening");
      break;
    }
    case "error":
      s2s.errors.push(event);
      setState("error", `${event.code}: ${event.message}`);
      break;
    case "bye":
      setState("closed", event.reason);
      break;
    default:
      break; // metrics and anything newer: not shown
  }
}

function onAudio(buffer) {
  const t = replyTurn;
  if (!t || t.interrupted) {
    s2s.staleFrames += 1; // nothing of an interrupted reply is played
    return;
  }
  const pcm = new Int16Array(buffer);
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 0x8000;
  s2s.receivedSamples += samples.length;
  if (t.voice_to_voice_ms === null && t.speechEndAt !== null) {
    t.voice_to_voice_ms = performance.now() - t.speechEndAt;
    view(t);
  }
  player.port.postMessage({ type: "audio", turn: t.id, samples }, [samples.buffer]);
}

function onPlayer(report) {
  s2s.playedSamples = report.played;
  if (report.type === "flushed" && socket && socket.readyState === WebSocket.OPEN) {
    const played = report.playedByTurn[report.turn] || 0;
    const played_ms = (1000 * played) / context.sampleRate;
    socket.send(JSON.stringify({ type: "playback", turn_id: report.turn, played_ms }));
  }
  if (report.type === "drained" && s2s.state === "speaking") setState("listening");
}

function socketUrl() {
  const url = new URL("/", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // Browsers cannot set an Authorization header on a WebSocket: the token is a query parameter.
  const token = params.get("token");
  if (token) url.searchParams.set("token", token);
  return url;
}

async function start() {
  ui.start.disabled = true;
  setState("starting");
  try {
    const probe = new AudioContext();
    const rate = SERVER_RATES.includes(probe.sampleRate) ? probe.sampleRate : 48000;
    await probe.close();
    context = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
    s2s.sampleRate = rate;
    await context.audioWorklet.addModule("capture.js");
    await context.audioWorklet.addModule("playback.js");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    microphone = new AudioWorkletNode(context, "s2s-capture", {
      processorOptions: { frameSamples: Math.round((rate * FRAME_MS) / 1000) },
    });
    player = new AudioWorkletNode(context, "s2s-playback", { outputChannelCount: [1] });
    player.port.onmessage = (event) => onPlayer(event.data);
    player.connect(context.destination);
    context.createMediaStreamSource(stream).connect(microphone);
    await context.resume();

    socket = new WebSocket(socketUrl());
    socket.binaryType = "arraybuffer";
    // The browser's own echo canceller (when it granted one) keeps the reply out of the
    // microphone: the server then needs no echo gate of its own.
    const echoCancelled = stream.getAudioTracks()[0].getSettings().echoCancellation === true;
    socket.onopen = () => {
      socket.send(JSON.stringify({
        type: "hello", protocol: 1, input_sample_rate: rate, output_sample_rate: rate,
        options: { echo_cancelled: echoCancelled },
      }));
    };
    socket.onmessage = (message) => {
      if (typeof message.data === "string") onEvent(JSON.parse(message.data));
      else onAudio(message.data);
    };
    socket.onclose = (close) => {
      setState("closed", close.reason || `code ${close.code}`);
      ui.start.disabled = false;
    };
    microphone.port.onmessage = (event) => {
      if (!socket || socket.readyState !== WebSocket.OPEN || s2s.sessionId === null) return;
      // Muted: silence still goes out, so the server hears the turn end.
      const frame = muted ? new Int16Array(event.data.byteLength / 2).buffer : event.data;
      socket.send(frame);
      sentSamples += frame.byteLength / 2;
      sendTimes.push([sentSamples, performance.now()]);
      if (sendTimes.length > 2000) sendTimes.splice(0, 1000);
    };
    ui.stop.disabled = false;
    ui.mute.disabled = false;
  } catch (error) {
    s2s.errors.push({ code: "client", message: String(error) });
    setState("error", String(error));
    ui.start.disabled = false;
  }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "interrupt" }));
});
ui.mute.addEventListener("click", () => {
  muted = !muted;
  ui.mute.textContent = muted ? "Unmute" : "Mute";
  ui.mute.setAttribute("aria-pressed", String(muted));
});

if (params.get("autostart") === "1") start();
