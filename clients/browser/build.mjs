// Builds dist/: the two pages, their bundled scripts (esbuild), the TensorFlow.js WASM
// binaries, uPlot's stylesheet, and the licenses of what is bundled. The server embeds dist/.
import { build } from 'esbuild';
import { cpSync, mkdirSync, rmSync, readFileSync, writeFileSync } from 'node:fs';

const out = process.argv[2] ?? 'dist';
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: { join: 'src/join.js', dashboard: 'src/dashboard.js' },
  bundle: true,
  format: 'esm',
  minify: true,
  target: 'es2020',
  outdir: out,
  legalComments: 'none',
  logLevel: 'warning',
});
for (const f of ['index.html', 'join.html', 'style.css']) cpSync(`src/${f}`, `${out}/${f}`);
const wasm = 'node_modules/@tensorflow/tfjs-backend-wasm/dist';
for (const f of ['tfjs-backend-wasm.wasm', 'tfjs-backend-wasm-simd.wasm']) cpSync(`${wasm}/${f}`, `${out}/${f}`);
cpSync('node_modules/uplot/dist/uPlot.min.css', `${out}/uPlot.min.css`);
// Third-party licenses of the bundled code. The @tensorflow packages ship no LICENSE file:
// their notice is the @license header of their builds, under Apache-2.0 (licenses/).
const tfjs = ['tfjs-core', 'tfjs-backend-cpu', 'tfjs-backend-webgl', 'tfjs-backend-webgpu', 'tfjs-backend-wasm'];
const notices = tfjs.map((p) => {
  const pkg = JSON.parse(readFileSync(`node_modules/@tensorflow/${p}/package.json`, 'utf8'));
  return `@tensorflow/${p} ${pkg.version} (${pkg.license}): Copyright Google LLC. All Rights Reserved.`;
});
writeFileSync(
  `${out}/THIRD_PARTY_LICENSES.txt`,
  [
    'TensorFlow.js\n=============\n',
    notices.join('\n'),
    '\nLicensed under the Apache License, Version 2.0:\n',
    readFileSync('licenses/Apache-2.0.txt', 'utf8'),
    '\nuPlot\n=====\n',
    readFileSync('node_modules/uplot/LICENSE', 'utf8'),
  ].join('\n'),
);
