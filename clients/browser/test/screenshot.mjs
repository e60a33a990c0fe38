// Saves a screenshot of a running server's dashboard (for the README's pictures):
//
//   node test/screenshot.mjs http://127.0.0.1:7070 OUT.png [WAIT_SECONDS]
//
// Waits until the page is live and the evaluator has reported, then WAIT_SECONDS more.
import { chromium } from 'playwright-core';

const [url, out, wait = '0'] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: ['--no-sandbox', '--disable-gpu'] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.goto(url);
  await page.waitForFunction(() => window.sparsyncState === 'live' && (window.sparsyncStatus?.evals ?? []).length > 0, null, { timeout: 60000 });
  await new Promise((r) => setTimeout(r, Number(wait) * 1000));
  await page.screenshot({ path: out, fullPage: true });
  console.log(`saved ${out}`);
} finally {
  await browser.close();
}
