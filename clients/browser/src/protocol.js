// sparsync wire protocol, version 1, for browsers (docs/protocol.md is the specification; the
// Rust definition is src/protocol/). Binary frames are little-endian: an 8-byte prefix (magic
// "SPSY", version, kind, flags), a kind-specific header, then u32 indices and f16 values.
// test/protocol.test.mjs checks this codec against frames the Rust side produced.

export const PROTOCOL_VERSION = 1;
export const KIND = { PUSH: 1, DELTA: 2, SNAPSHOT: 3 };
const MAGIC = [0x53, 0x50, 0x53, 0x59];
export const PUSH_HEADER_LEN = 40;
export const DELTA_HEADER_LEN = 32;
export const SNAPSHOT_HEADER_LEN = 24;

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32Bits(v) {
  f32[0] = v;
  return u32[0];
}

export function fromBits(b) {
  u32[0] = b >>> 0;
  return f32[0];
}

// Canonical form: subnormals and -0 become +0 (src/protocol/numerics.rs).
export function canon(v) {
  return (f32Bits(v) & 0x7f800000) === 0 ? 0 : v;
}

// f16 bits → number, exact (subnormals included).
export function f16ToF32(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

// number → f16 bits, via f32, round to nearest even, saturating at ±65504 (never infinity).
export function f32ToF16Sat(v) {
  const u = f32Bits(v);
  const s = (u >>> 16) & 0x8000;
  const a = u & 0x7fffffff;
  if (a >= 0x477ff000) return s | 0x7bff;
  if (a >= 0x38800000) {
    let h = (((a >>> 23) - 112) << 10) | ((a & 0x7fffff) >>> 13);
    const rem = a & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && (h & 1) === 1)) h += 1;
    return s | h;
  }
  if (a < 0x33000000) return s;
  const mm = (a & 0x7fffff) | 0x800000;
  const shift = 126 - (a >>> 23);
  let h = mm >>> shift;
  const rem = mm & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rem > half || (rem === half && (h & 1) === 1)) h += 1;
  return s | h;
}

// Applies one Delta entry to a replica value: canon(x + f32(h)) in binary32.
export function applyEntry(x, h) {
  return canon(Math.fround(x + f16ToF32(h)));
}

export class FrameError extends Error {
  constructor(field, message) {
    super(`${field}: ${message}`);
    this.field = field;
  }
}

function prefix(view, kind) {
  MAGIC.forEach((b, i) => view.setUint8(i, b));
  view.setUint16(4, PROTOCOL_VERSION, true);
  view.setUint8(6, kind);
  view.setUint8(7, 0);
}

export function sparsePayloadLen(nnz) {
  return 6 * nnz + (nnz % 2 ? 2 : 0);
}

// Encodes a Push. `indices` ascending (Uint32Array or array), `values` f16 bits.
export function encodePush(h, indices, values) {
  const nnz = indices.length;
  const buf = new ArrayBuffer(PUSH_HEADER_LEN + sparsePayloadLen(nnz));
  const v = new DataView(buf);
  prefix(v, KIND.PUSH);
  v.setBigUint64(8, BigInt(h.baseVersion), true);
  v.setBigUint64(16, BigInt(h.seq), true);
  v.setUint32(24, h.samples, true);
  v.setUint32(28, h.localSteps, true);
  v.setFloat32(32, h.loss, true);
  v.setUint32(36, nnz, true);
  for (let i = 0; i < nnz; i++) v.setUint32(PUSH_HEADER_LEN + 4 * i, indices[i], true);
  const vo = PUSH_HEADER_LEN + 4 * nnz;
  for (let i = 0; i < nnz; i++) v.setUint16(vo + 2 * i, values[i], true);
  return buf;
}

// Reads the common prefix; returns the kind.
export function checkPrefix(view) {
  if (view.byteLength < 8) throw new FrameError('length', `frame of ${view.byteLength} bytes is too short`);
  for (let i = 0; i < 4; i++) if (view.getUint8(i) !== MAGIC[i]) throw new FrameError('magic', 'bad magic');
  const ver = view.getUint16(4, true);
  if (ver !== PROTOCOL_VERSION) throw new FrameError('protocol_version', `frame says ${ver}, this page speaks ${PROTOCOL_VERSION}`);
  if (view.getUint8(7) !== 0) throw new FrameError('flags', 'flags must be 0');
  return view.getUint8(6);
}

// Decodes a Push (for tests and tools).
export function decodePush(buf) {
  const v = new DataView(buf);
  if (checkPrefix(v) !== KIND.PUSH) throw new FrameError('kind', 'not a push');
  const nnz = v.getUint32(36, true);
  if (buf.byteLength !== PUSH_HEADER_LEN + sparsePayloadLen(nnz)) throw new FrameError('nnz', 'length mismatch');
  const indices = new Uint32Array(nnz);
  const values = new Uint16Array(nnz);
  for (let i = 0; i < nnz; i++) indices[i] = v.getUint32(PUSH_HEADER_LEN + 4 * i, true);
  for (let i = 0; i < nnz; i++) values[i] = v.getUint16(PUSH_HEADER_LEN + 4 * nnz + 2 * i, true);
  return {
    baseVersion: Number(v.getBigUint64(8, true)),
    seq: Number(v.getBigUint64(16, true)),
    samples: v.getUint32(24, true),
    localSteps: v.getUint32(28, true),
    loss: v.getFloat32(32, true),
    indices,
    values,
  };
}

// Decodes and checks a Delta against a model of n parameters.
export function decodeDelta(buf, n) {
  const v = new DataView(buf);
  if (checkPrefix(v) !== KIND.DELTA) throw new FrameError('kind', 'not a delta');
  if (buf.byteLength < DELTA_HEADER_LEN) throw new FrameError('length', 'truncated delta');
  const nnz = v.getUint32(24, true);
  if (buf.byteLength !== DELTA_HEADER_LEN + sparsePayloadLen(nnz)) throw new FrameError('nnz', 'length mismatch');
  const indices = new Uint32Array(nnz);
  const values = new Uint16Array(nnz);
  let prev = -1;
  for (let i = 0; i < nnz; i++) {
    const idx = v.getUint32(DELTA_HEADER_LEN + 4 * i, true);
    if (idx <= prev || idx >= n) throw new FrameError('indices', `index ${idx} at ${i}`);
    indices[i] = idx;
    prev = idx;
  }
  for (let i = 0; i < nnz; i++) values[i] = v.getUint16(DELTA_HEADER_LEN + 4 * nnz + 2 * i, true);
  return { version: Number(v.getBigUint64(8, true)), baseVersion: Number(v.getBigUint64(16, true)), indices, values };
}

// Decodes a Snapshot (f32 values) of n parameters.
export function decodeSnapshot(buf, n) {
  const v = new DataView(buf);
  if (checkPrefix(v) !== KIND.SNAPSHOT) throw new FrameError('kind', 'not a snapshot');
  const count = v.getUint32(16, true);
  if (v.getUint8(20) !== 0) throw new FrameError('dtype', 'unknown dtype');
  if (count !== n || buf.byteLength !== SNAPSHOT_HEADER_LEN + 4 * count) throw new FrameError('n', `snapshot of ${count}, expected ${n}`);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) values[i] = v.getFloat32(SNAPSHOT_HEADER_LEN + 4 * i, true);
  return { version: Number(v.getBigUint64(8, true)), values };
}

// The public replica x̂: a snapshot, then Deltas applied in order.
export class Replica {
  constructor(n) {
    this.values = new Float32Array(n);
    this.version = null;
  }
  applySnapshot(buf) {
    const s = decodeSnapshot(buf, this.values.length);
    this.values.set(s.values);
    this.version = s.version;
    return s.version;
  }
  // Returns the new version, or null when the Delta does not follow (a resync is needed).
  applyDelta(buf) {
    const d = decodeDelta(buf, this.values.length);
    if (this.version === null || d.baseVersion !== this.version) return null;
    const x = this.values;
    for (let i = 0; i < d.indices.length; i++) x[d.indices[i]] = applyEntry(x[d.indices[i]], d.values[i]);
    this.version = d.version;
    return d.version;
  }
}

// FNV-1a 64 over the little-endian bytes of the values, as 16 hex digits.
export function checksum(values) {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  // Two 32-bit halves: h = h ^ b; h = h * 0x100000001b3 (mod 2^64).
  let hi = 0xcbf29ce4 >>> 0;
  let lo = 0x84222325 >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    lo = (lo ^ bytes[i]) >>> 0;
    // (hi·2^32 + lo) · (2^40 + 0x1b3) mod 2^64
    const loMul = lo * 0x1b3;
    const carry = Math.floor(loMul / 0x100000000);
    const newLo = loMul >>> 0;
    const newHi = (Math.imul(hi, 0x1b3) + carry + ((lo << 8) >>> 0)) >>> 0;
    hi = newHi;
    lo = newLo;
  }
  return hi.toString(16).padStart(8, '0') + lo.toString(16).padStart(8, '0');
}

// Top-k with error feedback (docs/algorithms.md §4): u = delta + r; send the k largest |u| as f16
// (ties to the lower index); r = u − what was sent. `residual` is a Float64Array kept by the
// caller. Returns { indices: Uint32Array, values: Uint16Array } in index order.
export function sparsify(delta, residual, k) {
  const n = delta.length;
  k = Math.min(k, n);
  const keys = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    residual[i] += delta[i];
    keys[i] = f32Bits(residual[i]) & 0x7fffffff;
  }
  if (k === 0) return { indices: new Uint32Array(0), values: new Uint16Array(0) };
  // k-th largest key.
  const sorted = keys.slice().sort();
  const t = sorted[n - k];
  let above = 0;
  for (let i = n - k + 1; i < n; i++) if (sorted[i] > t) above++;
  let takeEq = k - above;
  const indices = new Uint32Array(k);
  const values = new Uint16Array(k);
  let j = 0;
  for (let i = 0; i < n && j < k; i++) {
    const key = keys[i];
    if (key > t || (key === t && takeEq > 0)) {
      if (key === t) takeEq--;
      const u = residual[i];
      const h = f32ToF16Sat(Math.max(-65504, Math.min(65504, u)));
      residual[i] = u - f16ToF32(h);
      indices[j] = i;
      values[j] = h;
      j++;
    }
  }
  return { indices, values };
}
