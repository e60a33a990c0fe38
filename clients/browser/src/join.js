// The browser client served at /join: trains the server's model with TensorFlow.js on a shard
// of Fashion-MNIST that the server hands out, pushes Top-k updates with error feedback, keeps a
// replica of x̂ from Deltas, and reconnects when the server restarts. It follows the same
// protocol as the native client (docs/protocol.md); window.sparsync exposes its state.
//
// `?servers=HOST:PORT,…` (or ws:// URLs) names more servers that may serve the same training
// (a standby of `--wal nats://…`): after the page's own server, each is tried in turn when a
// connection is lost or cannot be made.

import * as tf from '@tensorflow/tfjs-core';
// tfjs-core alone registers no gradients (the full @tensorflow/tfjs bundle imports this).
import '@tensorflow/tfjs-core/dist/register_all_gradients';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-webgl';
import '@tensorflow/tfjs-backend-webgpu';
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import * as P from './protocol.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const clientId = params.get('id') || `browser-${Math.random().toString(36).slice(2, 8)}`;
const token = params.get('token');
const wsProto = location.protocol === 'https:' ? 'wss' : 'ws';
const ownServer = `${wsProto}://${location.host}/ws`;
const servers = [ownServer];
for (const s of (params.get('servers') || '').split(',').map((s) => s.trim()).filter(Boolean)) {
  const url = /^wss?:\/\//.test(s) ? s : `${wsProto}://${s}/ws`;
  if (!servers.includes(url)) servers.push(url);
}

const state = {
  clientId,
  backend: null,
  connected: false,
  version: null,
  seq: 0,
  pushes: 0,
  acked: 0,
  rejected: 0,
  busy: 0,
  rounds: 0,
  lastLoss: null,
  lastReject: null,
  lastError: null,
  paused: false,
  reconnects: 0,
  // The address of the current (or last) connection.
  server: ownServer,
  servers,
  log: [],
};

function log(msg) {
  const line = `${new Date().toISOString().slice(11, 19)} ${msg}`;
  state.log.push(line);
  if (state.log.length > 200) state.log.shift();
  const el = $('log');
  if (el) el.textContent = state.log.slice(-30).join('\n');
}

function render() {
  $('backend').textContent = state.backend ?? '…';
  $('status').textContent = state.connected ? 'connected' : 'disconnected';
  $('version').textContent = state.version ?? '-';
  $('pushes').textContent = `${state.acked} accepted / ${state.pushes} sent${state.rejected ? `, ${state.rejected} rejected` : ''}`;
  $('loss').textContent = state.lastLoss === null ? '-' : state.lastLoss.toFixed(4);
  $('rounds').textContent = state.rounds;
  $('checksum').textContent = replica ? P.checksum(replica.values) : '-';
  $('client').textContent = clientId;
}

// Backends in order of preference; the first that initialises wins.
async function pickBackend() {
  setWasmPaths('/assets/');
  for (const b of ['webgpu', 'webgl', 'wasm', 'cpu']) {
    try {
      if (b === 'webgpu' && !navigator.gpu) continue;
      if (await tf.setBackend(b)) {
        await tf.ready();
        return b;
      }
    } catch (e) {
      log(`backend ${b} unavailable: ${e.message ?? e}`);
    }
  }
  throw new Error('no TensorFlow.js backend');
}

// Data: the server's shard of the training set (and test images for the page's own check).
async function fetchData(path) {
    // With auth on, the data is behind the same token as the WebSocket.
  const r = await fetch(path, token ? { headers: { Authorization: `Bearer ${token}` } } : {});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  const buf = await r.arrayBuffer();
  const v = new DataView(buf);
  const magic = String.fromCharCode(...new Uint8Array(buf, 0, 4));
  if (magic !== 'SPDS') throw new Error(`${path}: not a sparsync data shard`);
  const count = v.getUint32(4, true);
  const rows = v.getUint8(8);
  const cols = v.getUint8(9);
  const labels = new Uint8Array(buf, 16, count);
  const images = new Uint8Array(buf, 16 + count, count * rows * cols);
  return { count, pixels: rows * cols, labels, images, shard: v.getUint16(10, true), shards: v.getUint16(12, true) };
}

// The model: the server's layout as tf.Variables (logreg: one linear layer; mlp: two with relu).
let vars = [];
let layout = [];
function buildModel(welcome) {
  layout = welcome.layout;
  const names = layout.map((t) => t.name).join(',');
  if (names !== 'fc.weight,fc.bias' && names !== 'fc1.weight,fc1.bias,fc2.weight,fc2.bias') {
    throw new Error(`this page trains logreg and mlp; the server serves ${welcome.model} (${names})`);
  }
  vars.forEach((v) => v.dispose());
  vars = layout.map((t) => tf.variable(tf.zeros(t.shape)));
}

function forward(x) {
  if (vars.length === 2) return tf.add(tf.matMul(x, vars[0]), vars[1]);
  return tf.add(tf.matMul(tf.relu(tf.add(tf.matMul(x, vars[0]), vars[1])), vars[2]), vars[3]);
}

function flatten() {
  const out = new Float32Array(replica.values.length);
  let at = 0;
  for (const v of vars) {
    const d = v.dataSync();
    out.set(d, at);
    at += d.length;
  }
  return out;
}

function setParams(values) {
  let at = 0;
  layout.forEach((t, i) => {
    const n = t.shape.reduce((a, b) => a * b, 1);
    vars[i].assign(tf.tensor(values.subarray(at, at + n), t.shape));
    at += n;
  });
}

function batch(data, size) {
  const idx = new Int32Array(size);
  for (let i = 0; i < size; i++) idx[i] = Math.floor(Math.random() * data.count);
  const x = new Float32Array(size * data.pixels);
  const y = new Int32Array(size);
  idx.forEach((s, i) => {
    for (let p = 0; p < data.pixels; p++) x[i * data.pixels + p] = data.images[s * data.pixels + p] / 255;
    y[i] = data.labels[s];
  });
  return { x: tf.tensor2d(x, [size, data.pixels]), y: tf.oneHot(tf.tensor1d(y, 'int32'), 10) };
}

// One local round: `steps` SGD steps; returns the mean loss.
async function trainRound(data, steps, size, lr) {
  let total = 0;
  for (let s = 0; s < steps; s++) {
    const { x, y } = batch(data, size);
    const loss = tf.tidy(() => {
      const { value, grads } = tf.variableGrads(() => tf.losses.softmaxCrossEntropy(y, forward(x)));
      vars.forEach((v) => v.assign(tf.sub(v, tf.mul(grads[v.name], lr))));
      return value;
    });
    total += (await loss.data())[0];
    loss.dispose();
    x.dispose();
    y.dispose();
    await tf.nextFrame();
  }
  return total / steps;
}

let ws = null;
let welcome = null;
let replica = null;
let residual = null;
let base = null;
let baseVersion = 0;
let directive = { local_steps: 10, batch_size: 32, learning_rate: 0.05 };
let ackWaiter = null;
let data = null;

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(typeof msg === 'string' ? msg : msg);
}

function onText(text) {
  const m = JSON.parse(text);
  switch (m.type) {
    case 'welcome':
      welcome = m;
      replica = new P.Replica(m.params);
      residual = residual && residual.length === m.params ? residual : new Float64Array(m.params);
      buildModel(m);
      log(`joined as session ${m.session}: model ${m.model} (${m.params} parameters), policy ${m.settings.policy}`);
      break;
    case 'directive':
      for (const k of ['local_steps', 'batch_size', 'learning_rate']) if (m[k] != null) directive[k] = m[k];
      break;
    case 'ack':
      state.acked++;
      if (ackWaiter && ackWaiter.seq === m.seq) ackWaiter.resolve(true);
      break;
    case 'reject':
      state.rejected++;
      state.lastReject = m;
      log(`push ${m.seq} rejected (${m.field}): ${m.reason}`);
      if (ackWaiter && ackWaiter.seq === m.seq) ackWaiter.resolve(false);
      break;
    case 'error':
      state.lastError = m;
      log(`server error (${m.field}): ${m.message}`);
      break;
    case 'bye':
      log(`server said bye: ${m.reason}`);
      break;
    default:
      break;
  }
}

function onBinary(buf) {
  const kind = P.checkPrefix(new DataView(buf));
  if (kind === P.KIND.SNAPSHOT) {
    state.version = replica.applySnapshot(buf);
    if (!base) adopt();
  } else if (kind === P.KIND.DELTA) {
    const v = replica.applyDelta(buf);
    if (v === null) send(JSON.stringify({ type: 'snapshot_request' }));
    else state.version = v;
  }
}

function adopt() {
  setParams(replica.values);
  base = replica.values.slice();
  baseVersion = replica.version;
}

// Connects to servers[turn % servers.length]; resolves once the server's Snapshot is in (the
// page is connected) or the connection closed (a refused hello, say).
function connect(turn) {
  return new Promise((resolve) => {
    state.server = servers[turn % servers.length];
    state.version = null;
    ws = new WebSocket(state.server);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      const hello = { type: 'hello', protocol: P.PROTOCOL_VERSION, client_id: clientId, kind: 'browser', model: state.model, role: 'trainer', device: `${navigator.userAgent.slice(0, 60)} (${state.backend})` };
      if (token) hello.token = token;
      // Reconnecting: prove that this page is the client whose session the server may still hold.
      if (welcome?.resume_secret) hello.resume_secret = welcome.resume_secret;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      try {
        if (typeof ev.data === 'string') onText(ev.data);
        else onBinary(ev.data);
        if (state.version !== null && !state.connected) {
          state.connected = true;
          resolve();
        }
      } catch (e) {
        state.lastError = { field: 'client', message: String(e) };
        log(`error: ${e}`);
      }
      render();
    };
    ws.onclose = () => {
      if (state.connected) log(`connection to ${state.server} closed`);
      state.connected = false;
      if (ackWaiter) ackWaiter.resolve(false);
      render();
      resolve();
    };
  });
}

async function loop() {
  // Connection attempts since the last success, and the address of the next one.
  let failures = 0;
  let turn = 0;
  for (;;) {
    if (!state.connected) {
      // Each address in turn; a growing wait before each full round of them.
      if (failures % servers.length === 0) {
        const round = failures / servers.length;
        await new Promise((r) => setTimeout(r, Math.min(5000, 250 * 2 ** Math.min(round, 4))));
      }
      failures++;
      turn++;
      state.reconnects++;
      base = null;
      await connect(turn);
      if (state.connected) {
        failures = 0;
        log(`connected to ${state.server}`);
      }
      continue;
    }
    if (state.paused) {
      await new Promise((r) => setTimeout(r, 100));
      continue;
    }
    const loss = await trainRound(data, directive.local_steps, directive.batch_size, directive.learning_rate);
    if (!state.connected || !base) {
      // Cut off while training: the round's change goes into the residual (the reconnection
      // adopts the server's x̂), so a later push carries it.
      if (base) {
        const x = flatten();
        for (let i = 0; i < x.length; i++) residual[i] += x[i] - base[i];
      }
      continue;
    }
    state.lastLoss = loss;
    state.rounds++;
    // Δ = x_local − x_base, Top-k with error feedback, one Push.
    const x = flatten();
    const delta = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) delta[i] = x[i] - base[i];
    const k = Math.min(Math.ceil(welcome.settings.rho_up * x.length), welcome.settings.max_nnz);
    const { indices, values } = P.sparsify(delta, residual, k);
    state.seq++;
    const frame = P.encodePush(
      { baseVersion, seq: state.seq, samples: directive.batch_size * directive.local_steps, localSteps: directive.local_steps, loss },
      indices,
      values,
    );
    const answered = new Promise((resolve) => (ackWaiter = { seq: state.seq, resolve }));
    // The connection may have closed while this round trained: then no answer can come.
    if (ws && ws.readyState === WebSocket.OPEN) send(frame);
    else ackWaiter.resolve(false);
    state.pushes++;
    render();
    const ok = await answered;
    ackWaiter = null;
    if (!ok) {
      // Refused or cut off: what was sent goes back into the residual.
      for (let i = 0; i < indices.length; i++) residual[indices[i]] += P.f16ToF32(values[i]);
      const r = state.lastReject;
      if (r && r.seq === state.seq && r.field === 'busy') {
        // The server cannot make pushes durable now: wait as it asks, then push again.
        state.busy++;
        await new Promise((res) => setTimeout(res, Math.min(30000, r.retry_after_ms ?? 1000)));
      }
    }
    if (state.connected) adopt();
    render();
  }
}

async function main() {
  try {
    state.backend = await pickBackend();
    log(`TensorFlow.js backend: ${state.backend}`);
    const status = await (await fetch('/api/status')).json();
    state.model = status.model;
    data = await fetchData('/api/data/shard');
    log(`data: shard ${data.shard + 1} of ${data.shards}, ${data.count} images`);
    render();
    await connect(0);
    await loop();
  } catch (e) {
    state.lastError = { field: 'client', message: String(e) };
    log(`stopped: ${e}`);
    render();
  }
}

// For people at the console and for tests.
window.sparsync = {
  state,
  checksum: () => (replica ? P.checksum(replica.values) : null),
  version: () => (replica ? replica.version : null),
  pause: () => { state.paused = true; },
  resume: () => { state.paused = false; },
  // Sends raw bytes as a binary frame (e.g. a forged Push) and returns them.
  sendRaw: (bytes) => { ws.send(bytes); return bytes.byteLength; },
  protocol: P,
  params: () => (replica ? replica.values.length : 0),
};

main();
