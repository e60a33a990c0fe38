// The dashboard served at /: the server's live state from /api/status and the /api/events
// stream (server-sent events carrying the same JSON on every change, and every second while
// the server is idle).

import uPlot from 'uplot';
import { History, directiveText } from './series.js';

const $ = (id) => document.getElementById(id);
const fmtBytes = (b) => (b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : b >= 1e6 ? `${(b / 1e6).toFixed(2)} MB` : `${(b / 1e3).toFixed(1)} kB`);
const esc = (s) => String(s ?? '').replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);
const fmtSecs = (s) => (s >= 1 ? `${s.toFixed(2)} s` : s >= 1e-3 ? `${(s * 1e3).toFixed(1)} ms` : `${(s * 1e6).toFixed(0)} µs`);

const rates = new History(512);
let last = null;
const window_ = [];
let accChart = null;
let rateChart = null;
let staleChart = null;
let lastUpdate = null;

function chart(el, title, series, data, opts = {}) {
  const width = Math.max(300, el.clientWidth - 10);
  return new uPlot(
    { title, width, height: 220, scales: { x: { time: false } }, series: [{ label: opts.x ?? 'seconds' }, ...series], axes: [{ label: opts.x ?? 'seconds' }, {}], ...opts.extra },
    data,
    el,
  );
}

function bar(value, max, color) {
  const w = max > 0 ? Math.max(1, Math.round((100 * value) / max)) : 0;
  return `<span class="bar" style="width:${w}%;background:${color}"></span>`;
}

function clientsTable(s) {
  const clients = s.clients.slice().sort((a, b) => (a.client_id < b.client_id ? -1 : a.client_id > b.client_id ? 1 : 0));
  const speed = (c) => (c.connected_s > 0 ? c.accepted / c.connected_s : 0);
  const maxSpeed = Math.max(0, ...clients.map(speed));
  const maxStale = Math.max(0, ...clients.map((c) => c.mean_staleness));
  const rows = clients
    .map(
      (c) => `<tr class="${c.kind}"><td>${esc(c.client_id)}</td><td>${esc(c.kind)}</td><td>${esc(c.role)}</td>
        <td>${esc(c.device)}</td>
        <td class="num">${speed(c).toFixed(1)}${bar(speed(c), maxSpeed, '#2ca02c')}</td>
        <td class="num">${c.accepted}</td><td class="num">${c.commits}</td><td class="num">${c.rejected}</td>
        <td class="num">${c.mean_staleness.toFixed(2)}${bar(c.mean_staleness, maxStale, '#9467bd')}</td>
        <td class="num">${c.last_loss.toFixed(3)}</td><td class="num">${fmtBytes(c.bytes_in)}</td><td class="num">${fmtBytes(c.bytes_out)}</td>
        <td>${c.lagging ? '<b>lagging</b>' : ''}</td><td class="directive">${esc(directiveText(c.directive))}</td></tr>`,
    )
    .join('');
  $('clients').innerHTML = rows || '<tr><td colspan="14">no clients connected</td></tr>';
  $('client-count').textContent = clients.length;
}

function stagesView(s) {
  const stages = s.stages ?? [];
  const max = Math.max(0, ...stages.map((x) => x.seconds));
  const coordinator = stages.filter((x) => x.stage !== 'send').reduce((a, x) => a + x.seconds, 0);
  $('stages').innerHTML = stages
    .map((x) => {
      const share = x.stage === 'send' || coordinator === 0 ? '' : `${((100 * x.seconds) / coordinator).toFixed(0)}%`;
      return `<tr><td>${esc(x.stage)}</td><td class="num">${fmtSecs(x.seconds)}</td><td class="num">${share}</td><td class="barcell">${bar(x.seconds, max, '#1f77b4')}</td></tr>`;
    })
    .join('');
}

function update(s) {
  window.sparsyncStatus = s;
  lastUpdate = new Date();
  $('model').textContent = `${s.model} (${s.params.toLocaleString()} parameters)`;
  $('version').textContent = s.version;
  $('policy').textContent = s.policy;
  $('engine').textContent = `${s.engine.kind} – ${s.engine.adapter} (${s.engine.backend}, ${s.engine.mode})`;
  $('uptime').textContent = `${s.uptime_s.toFixed(0)} s`;
  $('traffic').textContent = `${fmtBytes(s.bytes_in)} in, ${fmtBytes(s.bytes_out)} out`;
  $('updates').textContent = `${s.accepted} accepted, ${s.rejected} rejected, ${s.pending} pending`;
  $('settings').textContent = Object.entries(s.settings).map(([k, v]) => `${k}=${v}`).join('  ');
  $('policy-state').textContent = JSON.stringify(s.policy_state);
  const evals = s.evals ?? [];
  $('evals').textContent = evals.length
    ? `${s.evals_seen} evaluations over ${evals[0].t.toFixed(0)}–${evals[evals.length - 1].t.toFixed(0)} s, ${evals.length} plotted; last ${(100 * evals[evals.length - 1].accuracy).toFixed(1)}%`
    : 'no evaluator connected';

  // Rates over the last few seconds of snapshots (single snapshots are often 100 ms apart).
  window_.push(s);
  while (window_.length > 2 && s.uptime_s - window_[0].uptime_s > 3) window_.shift();
  const first = window_[0];
  if (s.uptime_s > first.uptime_s) {
    const rate = (s.aggregated - first.aggregated) / (s.uptime_s - first.uptime_s);
    const secs = s.aggregate_seconds - first.aggregate_seconds;
    const gbps = secs > 0 ? (s.aggregate_bytes - first.aggregate_bytes) / secs / 1e9 : 0;
    if (!last || s.uptime_s - last.uptime_s >= 0.5) {
      rates.push([s.uptime_s, rate]);
      last = s;
    }
    $('rate').textContent = `${rate.toFixed(1)} updates/s`;
    $('gbps').textContent = `${gbps.toFixed(2)} GB/s while aggregating`;
  }

  clientsTable(s);
  stagesView(s);

  const acc = [evals.map((e) => e.t), evals.map((e) => e.accuracy), evals.map((e) => e.loss)];
  if (!accChart) {
    accChart = chart(
      $('acc'),
      "Evaluator's accuracy and loss (whole run)",
      [{ label: 'accuracy', stroke: '#1f77b4', scale: 'acc' }, { label: 'loss', stroke: '#d62728', scale: 'loss' }],
      acc,
      {
        extra: {
          scales: { x: { time: false }, acc: { range: [0, 1] } },
          axes: [{ label: 'seconds' }, { scale: 'acc', label: 'accuracy' }, { scale: 'loss', side: 1, label: 'loss', grid: { show: false } }],
        },
      },
    );
  } else accChart.setData(acc);
  window.sparsyncCharts = { acc: accChart };
  const r = rates.points();
  const rateData = [r.map((p) => p[0]), r.map((p) => p[1])];
  if (!rateChart) rateChart = chart($('rates'), 'Aggregated updates per second', [{ label: 'updates/s', stroke: '#2ca02c' }], rateData);
  else rateChart.setData(rateData);
  const h = s.staleness_histogram.slice(0, 21);
  const stale = [h.map((_, i) => i), h];
  if (!staleChart) {
    staleChart = chart($('staleness'), 'Staleness of aggregated updates', [{ label: 'updates', stroke: '#9467bd', fill: '#9467bd88', paths: uPlot.paths.bars({ size: [0.8] }) }], stale, { x: 'staleness' });
  } else staleChart.setData(stale);
}

// Connection state: live while events arrive; "reconnecting" while the stream retries; "server
// stopped" once the server has not answered for a few seconds (the page keeps the last state
// and checks every few seconds whether a server is back).
function setState(state, text) {
  document.body.dataset.state = state;
  $('live').textContent = text;
  window.sparsyncState = state;
}

async function reachable() {
  try {
    const r = await fetch('/api/status', { cache: 'no-store' });
    return r.ok ? r.json() : null;
  } catch {
    return null;
  }
}

let events = null;
function connect() {
  events = new EventSource('/api/events');
  events.onmessage = (e) => {
    setState('live', 'live');
    update(JSON.parse(e.data));
  };
  events.onopen = () => setState('live', 'live');
  events.onerror = () => {
    if (document.body.dataset.state === 'stopped') return;
    setState('reconnecting', 'reconnecting…');
    watchdog();
  };
}

let watching = false;
async function watchdog() {
  if (watching) return;
  watching = true;
  let failures = 0;
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    const s = await reachable();
    if (s) {
      // The event stream gave up (the browser closes it on a non-200 answer): open it again.
      if (events.readyState === EventSource.CLOSED && document.body.dataset.state !== 'stopped') {
        connect();
      }
      if (document.body.dataset.state === 'stopped' || (window.sparsyncStatus && s.uptime_s < window.sparsyncStatus.uptime_s)) {
        // A (new) server answers: start over with its state.
        rates.kept = [];
        rates.newest = null;
        rates.seen = 0;
        rates.stride = 1;
        last = null;
        window_.length = 0;
        update(s);
        events.close();
        connect();
      }
      if (events.readyState === EventSource.OPEN) setState('live', 'live');
      break;
    }
    failures += 1;
    if (failures >= 3 && document.body.dataset.state !== 'stopped') {
      events.close();
      const at = lastUpdate ? lastUpdate.toLocaleTimeString() : 'never';
      setState('stopped', `server stopped (no answer since ${at}); showing its last state`);
    }
    if (document.body.dataset.state === 'stopped') await new Promise((r) => setTimeout(r, 4000));
  }
  watching = false;
}

async function main() {
  const s = await reachable();
  if (s) update(s);
  connect();
  if (!s) watchdog();
}

main();
