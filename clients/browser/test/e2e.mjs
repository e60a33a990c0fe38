// End to end in real headless Chromium (driven by playwright-core): the browser joins training
// at /join, its pushes are accepted, a forged frame gets the same Reject as from a native
// client, the dashboard at / shows both clients and a rising version (screenshot saved), and
// once everyone stops the page's replica checksum equals the server's. A page loaded from a
// second server that stops (given `?servers=` the first) goes on training on the first.
//
//   node test/e2e.mjs http://127.0.0.1:PORT OUT_DIR
//
// The caller (clients/native/tests/browser.rs) runs the server with a native client and an
// evaluator. Exit code 0 means every check passed; each failure says which.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const [base, out = '.', stopping] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const step = (msg) => console.log(`e2e: ${msg}`);
const fail = (msg) => {
  console.error(`e2e FAILED: ${msg}`);
  process.exitCode = 1;
  throw new Error(msg);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const json = async (path) => (await fetch(`${base}${path}`)).json();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  // A second server, which the caller stops a while after the start: its dashboard must end
  // up saying so.
  const gone = stopping ? await browser.newPage({ viewport: { width: 1400, height: 1000 } }) : null;
  if (gone) {
    await gone.goto(`${stopping}/`);
    await gone.waitForFunction(() => window.sparsyncState === 'live', null, { timeout: 15000 });
  }
  // A page of that second server that also names the first: it must move there when its own
  // server stops.
  const baseWs = `ws://${new URL(base).host}/ws`;
  const mover = stopping ? await browser.newPage() : null;
  if (mover) {
    mover.on('console', (m) => console.log(`[mover] ${m.text()}`));
    await mover.goto(`${stopping}/join?id=browser-mover&servers=${new URL(base).host}`);
  }
  const page = await browser.newPage();
  page.on('console', (m) => console.log(`[page] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
  await page.goto(`${base}/join?id=browser-e2e`);
  await page.waitForFunction(() => window.sparsync?.state.backend, null, { timeout: 60000 });
  const backend = await page.evaluate(() => window.sparsync.state.backend);
  step(`TensorFlow.js backend: ${backend}`);
  await page.waitForFunction(() => window.sparsync.state.acked >= 3, null, { timeout: 60000 });
  const acked = await page.evaluate(() => window.sparsync.state.acked);
  step(`the browser's pushes are accepted (${acked} so far)`);

  // The server's own status shows the browser client's commits. The status is republished at
  // most every 100 ms, so it may trail the Acks the page already has: wait for it (5 s at most).
  let me;
  for (let i = 0; i < 50; i++) {
    const st = await json('/api/status');
    me = st.clients.find((c) => c.client_id === 'browser-e2e');
    if (me && me.accepted >= 3) break;
    await sleep(100);
  }
  if (!me || me.kind !== 'browser' || me.accepted < 3) fail(`server status lacks the browser's pushes: ${JSON.stringify(me)}`);
  const { events } = await json('/api/record?limit=100000');
  const joined = events.find((e) => e.event === 'join' && e.client_id === 'browser-e2e');
  const commits = events.filter((e) => e.event === 'aggregate').flatMap((e) => e.items).filter((i) => i.session === joined.session);
  if (commits.length < 1) fail('no aggregated push of the browser client in the record');
  step(`server record: ${commits.length} aggregated pushes of the browser client`);

  // A forged frame from the page: an index past the end of the model.
  const reject = await page.evaluate(async () => {
    const s = window.sparsync;
    const P = s.protocol;
    const seq = s.state.seq + 1000;
    const frame = P.encodePush({ baseVersion: s.version(), seq, samples: 1, localSteps: 1, loss: 1 }, [s.params() + 5], [P.f32ToF16Sat(0.1)]);
    s.sendRaw(frame);
    for (let i = 0; i < 200; i++) {
      if (s.state.lastReject?.seq === seq) return s.state.lastReject;
      await new Promise((r) => setTimeout(r, 25));
    }
    return null;
  });
  if (!reject || reject.field !== 'indices' || !reject.reason.includes('out of range')) fail(`forged frame: ${JSON.stringify(reject)}`);
  step(`forged frame refused: ${reject.field}: ${reject.reason}`);

  // The dashboard: both clients, a rising version.
  const dash = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await dash.goto(`${base}/`);
  await dash.waitForFunction(() => (window.sparsyncStatus?.clients ?? []).some((c) => c.kind === 'native') && window.sparsyncStatus.clients.some((c) => c.kind === 'browser'), null, { timeout: 30000 });
  const v1 = await dash.evaluate(() => window.sparsyncStatus.version);
  await dash.waitForFunction((v) => window.sparsyncStatus.version > v, v1, { timeout: 30000 });
  const v2 = await dash.evaluate(() => window.sparsyncStatus.version);
  const table = await dash.textContent('#clients');
  if (!table.includes('browser-e2e') || !table.includes('native')) fail(`dashboard table: ${table}`);
  // The accuracy curve covers the whole run: it starts within the first seconds of the server's
  // run and ends within a few seconds of now, and the chart plots exactly that span.
  await dash.waitForFunction(() => (window.sparsyncStatus?.evals ?? []).length >= 5 && window.sparsyncStatus.uptime_s > 8, null, { timeout: 60000 });
  const span = await dash.evaluate(() => {
    const s = window.sparsyncStatus;
    const x = window.sparsyncCharts.acc.data[0];
    return { first: s.evals[0].t, last: s.evals[s.evals.length - 1].t, uptime: s.uptime_s, plotted: [x[0], x[x.length - 1]], n: x.length, seen: s.evals_seen };
  });
  if (span.first > 5) fail(`the accuracy curve starts at ${span.first} s, not at the start of the run: ${JSON.stringify(span)}`);
  if (span.uptime - span.last > 4) fail(`the accuracy curve ends at ${span.last} s but the run is at ${span.uptime} s`);
  if (span.plotted[0] !== span.first || span.plotted[1] !== span.last) fail(`the chart plots ${span.plotted} of the series ${span.first}…${span.last}`);
  step(`accuracy curve spans ${span.first.toFixed(1)}…${span.last.toFixed(1)} s of a ${span.uptime.toFixed(1)} s run (${span.n} points of ${span.seen})`);
  // Directives as fields, the stage times, per-client speed and staleness.
  const directive = await dash.textContent('#clients td.directive');
  if (directive.includes('{') || directive.includes('"')) fail(`directive shown as raw JSON: ${directive}`);
  const stages = await dash.$$eval('#stages tr', (rows) => rows.map((r) => r.textContent));
  if (stages.length !== 9 || !stages.some((r) => r.startsWith('aggregate'))) fail(`stage table: ${JSON.stringify(stages)}`);
  await sleep(1500);
  await dash.screenshot({ path: `${out}/dashboard.png`, fullPage: true });
  step(`dashboard shows both clients; version rose ${v1} → ${v2}; directive "${directive}"; ${stages.length} stages; screenshot ${out}/dashboard.png`);
  await page.screenshot({ path: `${out}/join.png`, fullPage: true });

  // The page whose server stopped trains on the other address it was given.
  if (mover) {
    await mover
      .waitForFunction((u) => window.sparsync?.state.connected && window.sparsync.state.server === u, baseWs, { timeout: 60000 })
      .catch(async () => fail(`the page of the stopped server did not move to ${baseWs}: ${JSON.stringify(await mover.evaluate(() => ({ ...window.sparsync.state, log: window.sparsync.state.log.slice(-10) })))}`));
    const before = await mover.evaluate(() => window.sparsync.state.acked);
    await mover.waitForFunction((n) => window.sparsync.state.acked >= n + 2, before, { timeout: 60000 });
    await mover.evaluate(() => window.sparsync.pause());
    let moved;
    for (let i = 0; i < 50; i++) {
      moved = (await json('/api/status')).clients.find((c) => c.client_id === 'browser-mover');
      if (moved && moved.accepted >= 2) break;
      await sleep(100);
    }
    if (!moved || moved.accepted < 2) fail(`the server lacks the moved page's pushes: ${JSON.stringify(moved)}`);
    step(`a page of the stopped server moved to ${baseWs} and trains there (${moved.accepted} pushes accepted there)`);
  } else step('no second server given: moving to another address was not checked');

  // Quiesce: the native trainer stops on its own; pause the page; wait until the server's
  // version stops moving, then compare replicas at that version.
  await page.evaluate(() => window.sparsync.pause());
  for (let i = 0; ; i++) {
    const s = await json('/api/status');
    if (!s.clients.some((c) => c.kind === 'native' && c.role === 'trainer') && s.pending === 0) break;
    if (i > 600) fail('the native trainer did not finish');
    await sleep(100);
  }
  let server = await json('/api/replica');
  for (let i = 0; i < 20; i++) {
    await sleep(250);
    const again = await json('/api/replica');
    if (again.version === server.version) break;
    server = again;
  }
  await page.waitForFunction((v) => window.sparsync.version() === v, server.version, { timeout: 30000 });
  const mine = await page.evaluate(() => window.sparsync.checksum());
  if (mine !== server.checksum) fail(`replica checksum ${mine} differs from the server's ${server.checksum} at version ${server.version}`);
  step(`replica equals the server's x̂ at version ${server.version} (checksum ${mine})`);

  // A server that went away: its page says so instead of "reconnecting…" forever.
  if (gone) {
    await gone.waitForFunction(() => window.sparsyncState === 'stopped', null, { timeout: 60000 }).catch(async () => {
      fail(`the dashboard of a stopped server shows: ${await gone.textContent('#live')}`);
    });
    const banner = await gone.textContent('#live');
    await gone.screenshot({ path: `${out}/dashboard-stopped.png`, fullPage: false });
    step(`dashboard of a stopped server: "${banner}"`);
  } else step('no second server given: the stopped state was not checked');
  console.log('e2e: 8 passed, 0 failed');} catch (e) {
  for (const p of browser.contexts().flatMap((c) => c.pages())) {
    const s = await p.evaluate(() => (window.sparsync ? { ...window.sparsync.state, log: window.sparsync.state.log.slice(-15) } : null)).catch(() => null);
    if (s) console.error(`page state: ${JSON.stringify(s, null, 1)}`);
  }
  console.error(`e2e FAILED: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
