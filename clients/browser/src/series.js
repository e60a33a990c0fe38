// Pieces of the dashboard that need no page: the bounded whole-run series and the
// readable form of a directive (unit-tested in test/series.test.mjs).

// A series over the whole session in bounded memory, thinned the way the server thins the
// evaluator's reports: every point until `cap`, then every 2nd, 4th, … point, plus the newest.
export class History {
  constructor(cap = 512) {
    this.cap = cap;
    this.stride = 1;
    this.seen = 0;
    this.kept = [];
    this.newest = null;
  }
  push(p) {
    const i = this.seen++;
    if (i % this.stride !== 0) {
      this.newest = p;
      return;
    }
    this.newest = null;
    this.kept.push(p);
    if (this.kept.length >= this.cap) {
      // Point j of kept is point j·stride of the run: keep the even ones; an odd newest
      // point stays as the newest.
      if (this.kept.length % 2 === 0) this.newest = p;
      this.kept = this.kept.filter((_, j) => j % 2 === 0);
      this.stride *= 2;
    }
  }
  points() {
    return this.newest ? [...this.kept, this.newest] : this.kept;
  }
}

// A directive as readable fields.
const DIRECTIVE_FIELDS = [
  ['local_steps', 'steps', (v) => v],
  ['batch_size', 'batch', (v) => v],
  ['learning_rate', 'lr', (v) => Number(v).toPrecision(3)],
  ['commit_interval_s', 'commit every', (v) => `${Number(v).toFixed(2)} s`],
  ['chunk_size', 'samples/round', (v) => v],
  ['local_epochs', 'epochs', (v) => v],
];
export function directiveText(d) {
  if (!d) return '';
  const parts = DIRECTIVE_FIELDS.filter(([k]) => d[k] != null).map(([k, name, f]) => `${name} ${f(d[k])}`);
  const text = parts.join(' · ') || 'server defaults';
  return d.reason ? `${text} (${d.reason})` : text;
}
