import { test } from 'node:test';
import assert from 'node:assert/strict';
import { History, directiveText } from '../src/series.js';

test('History keeps the whole run in bounded memory, ending with the newest point', () => {
  for (const n of [1, 7, 15, 16, 17, 32, 1000, 100003]) {
    const h = new History(16);
    for (let i = 0; i < n; i++) h.push(i);
    const p = h.points();
    assert.ok(p.length <= 17, `n=${n}: ${p.length} points`);
    assert.equal(p[0], 0);
    assert.equal(p[p.length - 1], n - 1);
    for (let j = 1; j < p.length; j++) assert.ok(p[j] - p[j - 1] <= h.stride && p[j] > p[j - 1], `n=${n}`);
  }
});

test('directives read as fields', () => {
  assert.equal(directiveText({ local_steps: 10, batch_size: 32, learning_rate: 0.05 }), 'steps 10 · batch 32 · lr 0.0500');
  assert.equal(directiveText({ commit_interval_s: 2.5, reason: 'adsp: rate 0.4/s' }), 'commit every 2.50 s (adsp: rate 0.4/s)');
  assert.equal(directiveText({}), 'server defaults');
});
