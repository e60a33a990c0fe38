// The dashboard served at /: the server's live state from /api/status and the /api/events
// stream (server-sent events carrying the same JSON on every change).

import uPlot from 'uplot';

const $ = (id) => document.getElementById(id);
const fmtBytes = (b) => (b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : b >= 1e6 ? `${(b / 1e6).toFixed(2)} MB` : `${(b / 1e3).toFixed(1)} kB`);
const esc = (s) => String(s ?? '').replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);

const history = { t: [], rate: [], gbps: [] };
let last = null;
const window_ = [];
let accChart = null;
let rateChart = null;
let staleChart = null;

function chart(el, title, series, data, opts = {}) {
  const width = Math.max(300, el.clientWidth - 10);
  return new uPlot(
    { title, width, height: 220, scales: { x: { time: false } }, series: [{ label: opts.x ?? 'seconds' }, ...series], axes: [{ label: opts.x ?? 'seconds' }, {}], ...opts.extra },
    data,
    el,
  );
}

function update(s) {
  window.sparsyncStatus = s;
  $('model').textContent = `${s.model} (${s.params.toLocaleString()} parameters)`;
  $('version').textContent = s.version;
  $('policy').textContent = s.policy;
  $('engine').textContent = `${s.engine.kind} – ${s.engine.adapter} (${s.engine.backend}, ${s.engine.mode})`;
  $('uptime').textContent = `${s.uptime_s.toFixed(0)} s`;
  $('traffic').textContent = `${fmtBytes(s.bytes_in)} in, ${fmtBytes(s.bytes_out)} out`;
  $('updates').textContent = `${s.accepted} accepted, ${s.rejected} rejected, ${s.pending} pending`;
  $('settings').textContent = Object.entries(s.settings).map(([k, v]) => `${k}=${v}`).join('  ');
  $('policy-state').textContent = JSON.stringify(s.policy_state);

    // Rates over the last few seconds of snapshots (single snapshots are often 100 ms apart).
  window_.push(s);
  while (window_.length > 2 && s.uptime_s - window_[0].uptime_s > 3) window_.shift();
  const first = window_[0];
  if (s.uptime_s > first.uptime_s) {
    const rate = (s.aggregated - first.aggregated) / (s.uptime_s - first.uptime_s);
    const secs = s.aggregate_seconds - first.aggregate_seconds;
    const gbps = secs > 0 ? (s.aggregate_bytes - first.aggregate_bytes) / secs / 1e9 : 0;
    if (!last || s.uptime_s - last.uptime_s >= 0.5) {
      history.t.push(s.uptime_s);
      history.rate.push(rate);
      history.gbps.push(gbps);
      if (history.t.length > 600) Object.values(history).forEach((a) => a.shift());
      last = s;
    }
    $('rate').textContent = `${rate.toFixed(1)} updates/s`;
    $('gbps').textContent = `${gbps.toFixed(2)} GB/s while aggregating`;
  }

  const rows = s.clients
    .slice()
    .sort((a, b) => a.session - b.session)
    .map(
      (c) => `<tr class="${c.kind}"><td>${esc(c.client_id)}</td><td>${esc(c.kind)}</td><td>${esc(c.role)}</td>
        <td>${esc(c.device)}</td><td>${c.commits}</td><td>${c.accepted}</td><td>${c.rejected}</td>
        <td>${c.last_staleness}</td><td>${c.last_loss.toFixed(3)}</td><td>${fmtBytes(c.bytes_in)}</td>
        <td>${c.lagging ? 'lagging' : ''}</td><td>${esc(JSON.stringify(c.directive))}</td></tr>`,
    )
    .join('');
  $('clients').innerHTML = rows || '<tr><td colspan="12">no clients connected</td></tr>';
  $('client-count').textContent = s.clients.length;

  const acc = [s.evals.map((e) => e.t), s.evals.map((e) => e.accuracy), s.evals.map((e) => e.loss)];
  if (!accChart) {
        accChart = chart(
      $('acc'),
      "Evaluator's accuracy and loss",
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
  const rates = [history.t, history.rate];
  if (!rateChart) rateChart = chart($('rates'), 'Aggregated updates per second', [{ label: 'updates/s', stroke: '#2ca02c' }], rates);
  else rateChart.setData(rates);
  const h = s.staleness_histogram.slice(0, 21);
  const stale = [h.map((_, i) => i), h];
  if (!staleChart) {
    staleChart = chart($('staleness'), 'Staleness of aggregated updates', [{ label: 'updates', stroke: '#9467bd', fill: '#9467bd88', paths: uPlot.paths.bars({ size: [0.8] }) }], stale, { x: 'staleness' });
  } else staleChart.setData(stale);
}

async function main() {
  update(await (await fetch('/api/status')).json());
  const events = new EventSource('/api/events');
  events.onmessage = (e) => update(JSON.parse(e.data));
  events.onerror = () => ($('live').textContent = 'reconnecting…');
  events.onopen = () => ($('live').textContent = 'live');
}

main();
