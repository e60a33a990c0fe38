// The browser codec against frames the Rust side produced (tests/browser_fixtures.rs keeps
// them current): decode them, re-encode the Push byte for byte, apply the Delta to a replica and
// match Rust's bits and checksum, and convert f16 like Rust does.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as P from '../src/protocol.js';

const dir = new URL('./fixtures/', import.meta.url);
const bin = (name) => {
  const b = readFileSync(new URL(name, dir));
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
};
const expected = JSON.parse(readFileSync(new URL('expected.json', dir), 'utf8'));

test('push decodes and re-encodes to the same bytes', () => {
  const buf = bin('push.bin');
  const p = P.decodePush(buf);
  const e = expected.push;
  assert.equal(p.baseVersion, e.base_version);
  assert.equal(p.seq, e.seq);
  assert.equal(p.samples, e.samples);
  assert.equal(p.localSteps, e.local_steps);
  assert.equal(p.loss, e.loss);
  assert.deepEqual([...p.indices], e.indices);
  assert.deepEqual([...p.values], e.values);
  const again = P.encodePush(
    { baseVersion: e.base_version, seq: e.seq, samples: e.samples, localSteps: e.local_steps, loss: e.loss },
    e.indices,
    e.values,
  );
  assert.deepEqual(new Uint8Array(again), new Uint8Array(buf));
});

test('snapshot then delta give the Rust replica bit for bit', () => {
  const n = expected.snapshot.values.length;
  const r = new P.Replica(n);
  assert.equal(r.applySnapshot(bin('snapshot.bin')), 7);
  assert.deepEqual([...r.values].map(P.f32Bits), expected.snapshot.values);
  assert.equal(r.applyDelta(bin('delta.bin')), 8);
  assert.deepEqual([...r.values].map(P.f32Bits), expected.replica_after_delta);
  assert.equal(P.checksum(r.values), expected.checksum);
  // A Delta that does not follow is refused (the caller asks for a resync).
  assert.equal(r.applyDelta(bin('delta.bin')), null);
});

test('f16 conversion rounds and saturates like Rust', () => {
  for (const [bits, h] of expected.f16) {
    assert.equal(P.f32ToF16Sat(P.fromBits(bits)), h, `f32 bits ${bits}`);
  }
  for (let h = 0; h < 0x7c00; h += 37) {
    assert.equal(P.f32ToF16Sat(P.f16ToF32(h)), h, `f16 ${h} round trips`);
  }
});

test('bad frames name their field', () => {
  const buf = bin('delta.bin');
  const bad = new Uint8Array(buf.slice(0));
  bad[0] = 0;
  assert.throws(() => P.decodeDelta(bad.buffer, 8), (e) => e.field === 'magic');
  assert.throws(() => P.decodeDelta(buf, 5), (e) => e.field === 'indices');
  assert.throws(() => P.decodeDelta(buf.slice(0, 40), 8), (e) => e.field === 'nnz');
});

test('sparsify keeps what it does not send', () => {
  const delta = new Float32Array([0.1, -5, 0.2, 3, -0.3, 0]);
  const r = new Float64Array(6);
  const s = P.sparsify(delta, r, 2);
  assert.deepEqual([...s.indices], [1, 3]);
  assert.equal(P.f16ToF32(s.values[0]), -5);
  for (let i = 0; i < 6; i++) {
    const sent = [...s.indices].includes(i) ? P.f16ToF32(s.values[[...s.indices].indexOf(i)]) : 0;
    assert.equal(sent + r[i], Math.fround(delta[i]));
  }
  const next = P.sparsify(new Float32Array(6), r, 1);
  assert.deepEqual([...next.indices], [4]);
});
