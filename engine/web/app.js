// PersonaPlex web client: microphone -> Opus (WebCodecs) in Ogg pages -> /api/chat websocket;
// server Ogg/Opus -> WebCodecs decoder -> speakers; text pieces -> transcript.
// Echo cancellation is the browser's (getUserMedia echoCancellation: true); the server does none.
"use strict";
const $ = (id) => document.getElementById(id);
const KIND = { handshake: 0, audio: 1, text: 2, error: 5 };
const RATE = 24000, FRAME = 1920, PACKETS_PER_PAGE = 4;
const stats = (window.ppStats = { state: "idle", handshake: false, sentMessages: 0, recvAudio: 0,
  decodedFrames: 0, textPieces: 0, errors: [] });

// ---- Ogg framing (RFC 3533) with the Ogg CRC-32 (polynomial 0x04c11db7, not reflected)
const CRC = (() => { const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) { let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    t[i] = r >>> 0; }
  return t; })();
function crc32(b) { let c = 0; for (let i = 0; i < b.length; i++) c = ((c << 8) ^ CRC[((c >>> 24) ^ b[i]) & 0xff]) >>> 0; return c; }

class OggWriter {
  constructor() { this.serial = (Math.random() * 0x7fffffff) | 0; this.seq = 0; this.granule = 0; }
  page(packets, flags) {
    const lacing = [];
    for (const p of packets) { let n = p.length; while (n >= 255) { lacing.push(255); n -= 255; } lacing.push(n); }
    const body = packets.reduce((a, p) => a + p.length, 0);
    const buf = new Uint8Array(27 + lacing.length + body), dv = new DataView(buf.buffer);
    buf.set([0x4f, 0x67, 0x67, 0x53, 0, flags]);
    dv.setUint32(6, this.granule % 2 ** 32, true); dv.setUint32(10, Math.floor(this.granule / 2 ** 32), true);
    dv.setUint32(14, this.serial, true); dv.setUint32(18, this.seq++, true);
    buf[26] = lacing.length; buf.set(lacing, 27);
    let o = 27 + lacing.length; for (const p of packets) { buf.set(p, o); o += p.length; }
    dv.setUint32(22, crc32(buf), true);
    return buf;
  }
  headers() {
    const head = new Uint8Array(19), dv = new DataView(head.buffer);
    head.set(new TextEncoder().encode("OpusHead")); head[8] = 1; head[9] = 1;
    dv.setUint16(10, 312, true); dv.setUint32(12, RATE, true);
    const vendor = new TextEncoder().encode("engine-web");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4), tv = new DataView(tags.buffer);
    tags.set(new TextEncoder().encode("OpusTags")); tv.setUint32(8, vendor.length, true); tags.set(vendor, 12);
    return [this.page([head], 2), this.page([tags], 0)];
  }
}

class OggReader {            // bytes in (any split), Opus packets out (headers skipped)
  constructor(onHead, onPacket) { this.buf = new Uint8Array(0); this.part = []; this.n = 0; this.onHead = onHead; this.onPacket = onPacket; }
  push(bytes) {
    const b = new Uint8Array(this.buf.length + bytes.length); b.set(this.buf); b.set(bytes, this.buf.length); this.buf = b;
    for (;;) {
      const buf = this.buf; if (buf.length < 27) return;
      if (buf[0] !== 0x4f || buf[1] !== 0x67 || buf[2] !== 0x67 || buf[3] !== 0x53) throw new Error("bad Ogg page");
      const nseg = buf[26]; if (buf.length < 27 + nseg) return;
      let body = 0; for (let i = 0; i < nseg; i++) body += buf[27 + i];
      const end = 27 + nseg + body; if (buf.length < end) return;
      let o = 27 + nseg;
      for (let i = 0; i < nseg; i++) {
        const len = buf[27 + i]; this.part.push(buf.slice(o, o + len)); o += len;
        if (len < 255) {
          const total = this.part.reduce((a, p) => a + p.length, 0), pkt = new Uint8Array(total);
          let q = 0; for (const p of this.part) { pkt.set(p, q); q += p.length; }
          this.part = [];
          if (this.n === 0) this.onHead(pkt); else if (this.n > 1) this.onPacket(pkt);
          this.n++;
        }
      }
      this.buf = buf.slice(end);
    }
  }
}

// ---- UI
// The server's auth token, when it needs one: browsers cannot set websocket headers, so the page
// takes it from its own URL (/?token=...) and passes it on as a query parameter. URLs are relative
// to the page, so the app also works mounted under a prefix.
const TOKEN = new URLSearchParams(location.search).get("token");
function apiUrl(path) {
  const u = new URL(path, location.href);
  if (TOKEN) u.searchParams.set("token", TOKEN);
  return u;
}
async function loadChoices() {
  const r = await fetch(apiUrl("api/voices")); const info = await r.json();
  for (const v of info.voices) $("voice").add(new Option(v, v));
  const want = new URLSearchParams(location.search).get("voice");
  if (want) $("voice").value = want;
  for (const [name, text] of Object.entries(info.prompts)) $("preset").add(new Option(name, text));
  $("preset").add(new Option("custom", ""));
  $("preset").value = info.prompts[info.default_prompt]; $("prompt").value = $("preset").value;
  $("preset").onchange = () => { $("prompt").value = $("preset").value; };
}
function status(s) { stats.state = s; $("status").textContent = s; }

let session = null;
async function connect() {
  $("connect").disabled = true; $("stop").disabled = false; $("transcript").textContent = "";
  if (!("AudioEncoder" in window) || !("AudioDecoder" in window)) {
    status("This browser has no WebCodecs audio: use a recent Chromium/Chrome."); return; }
  const s = (session = { closed: false });
  const ctx = (s.ctx = new AudioContext({ sampleRate: RATE }));
  s.mic = await navigator.mediaDevices.getUserMedia({ audio: {
    echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
  const q = new URLSearchParams({ voice_prompt: $("voice").value, text_prompt: $("prompt").value,
    seed: $("seed").value || "-1", text_temperature: "0.7", text_topk: "25", audio_temperature: "0.8", audio_topk: "250" });
  if (TOKEN) q.set("token", TOKEN);
  const wsUrl = new URL("api/chat?" + q, location.href);
  wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = (s.ws = new WebSocket(wsUrl));
  ws.binaryType = "arraybuffer";
  status("Connecting: the server runs the voice and prompt phases first...");

  // outgoing: mic -> 1920-sample frames -> Opus packets -> Ogg pages
  const ogg = new OggWriter(); let pending = [], t = 0;
  s.enc = new AudioEncoder({
    output: (chunk) => {
      const p = new Uint8Array(chunk.byteLength); chunk.copyTo(p); pending.push(p);
      ogg.granule += Math.round((chunk.duration || 20000) * 48000 / 1e6);
      if (pending.length >= PACKETS_PER_PAGE && ws.readyState === 1) {
        send(ogg.page(pending, 0)); pending = []; }
    },
    error: (e) => stats.errors.push("encoder: " + e.message) });
  s.enc.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000,
    opus: { frameDuration: 20000, application: "audio" } });
  const send = (bytes) => { const m = new Uint8Array(bytes.length + 1); m[0] = KIND.audio; m.set(bytes, 1);
    ws.send(m); stats.sentMessages++; };
  const src = ctx.createMediaStreamSource(s.mic), proc = ctx.createScriptProcessor(2048, 1, 1);
  let acc = new Float32Array(0);
  proc.onaudioprocess = (ev) => {
    if (!stats.handshake || s.closed) return;
    const x = ev.inputBuffer.getChannelData(0), b = new Float32Array(acc.length + x.length);
    b.set(acc); b.set(x, acc.length); acc = b;
    let peak = 0; for (let i = 0; i < x.length; i++) peak = Math.max(peak, Math.abs(x[i]));
    $("meter").style.width = Math.min(100, peak * 300) + "%";
    while (acc.length >= FRAME) {
      const frame = acc.slice(0, FRAME); acc = acc.slice(FRAME);
      s.enc.encode(new AudioData({ format: "f32", sampleRate: RATE, numberOfFrames: FRAME,
        numberOfChannels: 1, timestamp: t, data: frame }));
      t += FRAME * 1e6 / RATE;
    }
  };
  src.connect(proc); proc.connect(ctx.destination);

  // incoming: Ogg pages -> Opus packets -> PCM -> scheduled playback
  let playAt = 0;
  s.dec = new AudioDecoder({
    output: (data) => {
      const n = data.numberOfFrames, pcm = new Float32Array(n);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      const buf = ctx.createBuffer(1, n, data.sampleRate); buf.copyToChannel(pcm, 0);
      const node = ctx.createBufferSource(); node.buffer = buf; node.connect(ctx.destination);
      playAt = Math.max(playAt, ctx.currentTime + 0.08); node.start(playAt); playAt += n / data.sampleRate;
      data.close(); stats.decodedFrames++;
    },
    error: (e) => stats.errors.push("decoder: " + e.message) });
  const reader = new OggReader(
    (head) => s.dec.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: 1, description: head }),
    (pkt) => { s.dec.decode(new EncodedAudioChunk({ type: "key", timestamp: 0, data: pkt })); });

  ws.onopen = () => status("Connected; waiting for the handshake...");
  ws.onmessage = (ev) => {
    const m = new Uint8Array(ev.data), kind = m[0], body = m.subarray(1);
    if (kind === KIND.handshake) { stats.handshake = true; status("Live: talk now.");
      for (const p of ogg.headers()) send(p); }
    else if (kind === KIND.audio) { stats.recvAudio++; reader.push(body); }
    else if (kind === KIND.text) { stats.textPieces++; $("transcript").textContent += new TextDecoder().decode(body); }
    else if (kind === KIND.error) { const e = new TextDecoder().decode(body); stats.errors.push(e); status("Server: " + e); }
  };
  ws.onclose = (ev) => { if (!s.closed) status(`Disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""}).`); stop(false); };
  ws.onerror = () => stats.errors.push("websocket error");
}

function stop(byUser = true) {
  const s = session; if (!s || s.closed) return; s.closed = true;
  if (byUser) status("Stopped.");
  try { s.ws.close(); } catch (e) { /* already closed */ }
  for (const tr of s.mic.getTracks()) tr.stop();
  s.ctx.close();
  $("connect").disabled = false; $("stop").disabled = true;
}

$("connect").onclick = () => connect().catch((e) => { stats.errors.push(String(e)); status("Error: " + e.message); });
$("stop").onclick = () => stop(true);
loadChoices().then(() => {
  if (new URLSearchParams(location.search).get("autostart") === "1") $("connect").click();
});
