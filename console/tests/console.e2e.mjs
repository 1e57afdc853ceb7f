// The console in a real headless Chromium (Debian's, driven by playwright-core; no browser
// download) against a real platform. Run by tests/e2e/console.rs, which starts the platform:
//   CONSOLE_URL=http://127.0.0.1:8080 ADMIN_KEY=flk_… node tests/console.e2e.mjs
// Optional: SHOTS_DIR (screenshots of each page), MEASURE=1 (device page load with a week of
// 10-second readings). Any failed step exits 1 with what it waited for.
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { chromium } from 'playwright-core';

const BASE = process.env.CONSOLE_URL;
const ADMIN = process.env.ADMIN_KEY;
const SHOTS = process.env.SHOTS_DIR;
if (!BASE || !ADMIN) throw new Error('CONSOLE_URL and ADMIN_KEY are required');

function step(name) {
  console.log(`· ${name}`);
}

async function api(method, path, key, body, contentType = 'application/json') {
  const response = await fetch(BASE + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body !== undefined ? { 'Content-Type': contentType } : {}) },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {}
  return { status: response.status, json, text };
}

async function eventually(what, timeoutMs, check) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

// A webhook receiver on loopback: answers 410 (which disables a webhook at once) or 200.
let receiverAnswer = 200;
const received = [];
const receiver = createServer((req, res) => {
  let body = '';
  req.on('data', (chunk) => (body += chunk));
  req.on('end', () => {
    received.push({ status: receiverAnswer, body });
    res.writeHead(receiverAnswer, { 'Content-Type': 'text/plain' });
    res.end(receiverAnswer === 200 ? 'thanks' : 'gone');
  });
});
await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
const receiverUrl = `http://127.0.0.1:${receiver.address().port}/hook`;

const profile = mkdtempSync(join(tmpdir(), 'fieldline-console-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: 1280, height: 860 },
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(10_000);
const consoleErrors = [];
page.on('pageerror', (error) => consoleErrors.push(error.message));

async function shot(name, fullPage = true) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage });
}

let failed = false;
try {
  step('sign in');
  await page.goto(BASE + '/');
  await shot('sign-in', false);
  await page.fill('input[name=key]', 'flk_wrong');
  await page.click('button[type=submit]');
  await page.waitForSelector('.error');
  await page.fill('input[name=key]', ADMIN);
  await page.click('button[type=submit]');
  await page.waitForSelector('h1:has-text("Overview")');
  const stored = await page.evaluate(() => [sessionStorage.getItem('fieldline.key'), localStorage.getItem('fieldline.key')]);
  if (stored[0] !== ADMIN || stored[1] !== null) throw new Error('the key must be in sessionStorage only');

  step('create a device and read its token');
  await page.click('nav a:has-text("Devices")');
  await page.click('button:has-text("New device")');
  await page.fill('[data-testid=new-device] input[name=id]', 'greenhouse-1');
  await page.fill('[data-testid=new-device] input[name=group]', 'greenhouse');
  await page.fill('[data-testid=new-device] input[name=tags]', 'roof, east');
  await page.click('[data-testid=new-device] button[type=submit]');
  const token = (await page.textContent('[data-testid=secret-value]')).trim();
  if (!token.startsWith('fld_')) throw new Error(`not a device token: ${token}`);
  await page.waitForSelector('td a:has-text("greenhouse-1")');

  step('a reading sent over HTTP is on the chart within 2 s, live');
  // A first reading makes the metric (and so the chart) exist.
  const ingest = (values) => api('POST', '/api/v1/ingest', token, values);
  if ((await ingest({ temperature: 20.5, humidity: 60 })).status !== 202) throw new Error('ingest refused');
  await page.click('td a:has-text("greenhouse-1")');
  await page.waitForSelector('[data-testid=chart]');
  await page.selectOption('select[aria-label=metric]', 'temperature');
  // The history of temperature loaded (the page polls no history: what comes next is live).
  await page.waitForSelector('[data-testid=chart-source]:has-text("of temperature")');
  await eventually('the first point', 10_000, async () => Number(await page.getAttribute('[data-testid=chart][data-metric=temperature]', 'data-points')) >= 1);
  await eventually('the live stream', 10_000, async () => (await page.textContent('[data-testid=live-state]')) === 'open');
  const before = Number(await page.getAttribute('[data-testid=chart]', 'data-points'));
  const sent = Date.now();
  if ((await ingest({ temperature: 23.25 })).status !== 202) throw new Error('ingest refused');
  await page.waitForFunction((n) => Number(document.querySelector('[data-testid=chart]').dataset.points) > n, before, { timeout: 2000 });
  console.log(`  on the chart ${Date.now() - sent} ms after the POST`);
  await page.waitForSelector('[data-testid=latest] strong:has-text("23.25")', { timeout: 2000 });
  for (let i = 0; i < 12; i++) await ingest({ temperature: 21 + Math.sin(i / 2) * 2, humidity: 58 + i / 3, ts: new Date(Date.now() - (12 - i) * 60_000).toISOString() });
  await page.click('button:has-text("15m")');
  await page.waitForTimeout(800);
  await shot('device');

  step('zoom by dragging across the chart, CSV of the window');
  const over = await page.locator('[data-testid=chart] .u-over').boundingBox();
  await page.mouse.move(over.x + over.width * 0.5, over.y + over.height / 2);
  await page.mouse.down();
  await page.mouse.move(over.x + over.width * 0.98, over.y + over.height / 2, { steps: 5 });
  await page.mouse.up();
  await page.waitForSelector('button:has-text("Reset zoom")');
  const [csv] = await Promise.all([page.waitForEvent('download'), page.click('button:has-text("CSV")')]);
  const { readFileSync } = await import('node:fs');
  const text = readFileSync(await csv.path(), 'utf8');
  // The zoomed window (the second half of the last 15 minutes) holds a few of the readings.
  const rows = text.trim().split('\n');
  if (rows[0] !== 'ts,metric,value' || !rows.slice(1).some((row) => row.includes(',temperature,'))) throw new Error(`CSV: ${JSON.stringify(text.slice(0, 300))}`);
  await page.click('button:has-text("Reset zoom")');

  step('register a webhook to a local receiver and see the delivery in the log');
  await page.click('nav a:has-text("Webhooks")');
  await page.fill('[data-testid=new-webhook] input[name=name]', 'local receiver');
  await page.fill('[data-testid=new-webhook] input[name=url]', receiverUrl);
  await page.click('[data-testid=new-webhook] button[type=submit]');
  const whsec = (await page.textContent('[data-testid=secret-value]')).trim();
  if (!whsec.startsWith('whsec_')) throw new Error(`not a webhook secret: ${whsec}`);
  await page.click('td a:has-text("local receiver")');
  await page.click('button:has-text("Send test")');
  await page.waitForSelector('[data-testid=deliveries] .delivery[data-status=succeeded]', { timeout: 15_000 });
  await page.click('[data-testid=deliveries] .delivery summary');
  await page.waitForSelector('.attempts td:has-text("200")');
  await page.waitForSelector('.snippet:has-text("thanks")');
  await shot('webhook');

  step('disabled by failures (410), enabled and recovered');
  receiverAnswer = 410;
  await ingest({ temperature: 22 });
  await page.waitForSelector('[data-testid=webhook-state]:has-text("disabled")', { timeout: 20_000 });
  await page.waitForSelector('[data-testid=deliveries] .attempts td:has-text("410"), [data-testid=deliveries] summary:has-text("410")', { timeout: 10_000, state: 'attached' });
  receiverAnswer = 200;
  const deliveredBefore = received.filter((r) => r.status === 200).length;
  await page.click('button:has-text("Enable")');
  await page.waitForSelector('[data-testid=webhook-state]:has-text("enabled")', { timeout: 10_000 });
  await page.click('button:has-text("Recover")');
  await page.waitForSelector('.note:has-text("Recovered")');
  await eventually('deliveries after enable and recover', 20_000, async () => received.filter((r) => r.status === 200).length > deliveredBefore);
  await page.click('nav a:has-text("Webhooks")');
  await page.waitForSelector('td a:has-text("local receiver")');
  await shot('webhooks');

  step('a firing alert appears on the overview');
  await page.click('nav a:has-text("Alerts")');
  const rule = page.locator('form.inline').first();
  await rule.locator('input[placeholder=name]').fill('greenhouse too hot');
  await rule.locator('input[placeholder^="device id"]').fill('greenhouse-1');
  await rule.locator('input[placeholder=metric]').fill('temperature');
  await rule.locator('input[placeholder=threshold]').fill('30');
  await rule.locator('input[placeholder^="for"]').fill('0');
  await rule.locator('select[aria-label=severity]').selectOption('critical');
  await rule.locator('button[type=submit]').click();
  await page.waitForSelector('td:has-text("greenhouse too hot")');
  await ingest({ temperature: 35.5 });
  await page.click('nav a:has-text("Overview")');
  await page.waitForSelector('[data-testid=firing] li:has-text("greenhouse too hot")', { timeout: 15_000 });
  await page.waitForSelector('[data-testid=tile-alerts] .big:has-text("1")');
  await shot('overview');
  await page.click('nav a:has-text("Alerts")');
  await page.waitForSelector('[data-testid=firing-table] td:has-text("greenhouse too hot")');
  await shot('alerts');

  step('rotate a key and see the old one refused after its grace');
  const created = await api('POST', '/api/v1/keys', ADMIN, { name: 'dashboard', scopes: ['read'] });
  const oldSecret = created.json.data.secret;
  await page.click('nav a:has-text("Keys")');
  await page.fill('input[aria-label=grace]', '2');
  await page.click('tr[data-key=dashboard] button:has-text("Rotate")');
  const newSecret = (await page.textContent('[data-testid=secret-value]')).trim();
  if ((await api('GET', '/api/v1/limits', oldSecret)).status !== 200) throw new Error('the old key must work during its grace');
  await eventually('the old key refused', 10_000, async () => (await api('GET', '/api/v1/limits', oldSecret)).status === 401);
  if ((await api('GET', '/api/v1/limits', newSecret)).status !== 200) throw new Error('the new key must work');
  await page.click('[data-testid=secret] button:has-text("Done")');
  await shot('keys');

  await page.click('nav a:has-text("Devices")');
  await page.waitForSelector('td a:has-text("greenhouse-1")');
  await shot('devices');

  step('dark theme, phone width');
  await page.click('button.theme');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(BASE + '/#/devices/greenhouse-1');
  await page.waitForSelector('[data-testid=chart]');
  await page.waitForTimeout(800);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 2) throw new Error(`the device page is ${overflow}px wider than a phone`);
  await shot('device-phone-dark');
  await page.setViewportSize({ width: 1280, height: 860 });
  await page.goto(BASE + '/#/');
  await page.waitForSelector('[data-testid=firing] li');
  await shot('overview-dark');
  await page.click('button.theme');

  if (process.env.MEASURE) {
    step('device page load with a week of 10-second readings');
    await api('POST', '/api/v1/devices', ADMIN, { id: 'week-1' });
    const now = Date.now();
    const start = now - 7 * 86400_000;
    const lines = ['ts,temperature'];
    for (let t = start; t < now - 10_000; t += 10_000) lines.push(`${t},${(20 + 5 * Math.sin(t / 3600_000)).toFixed(2)}`);
    const imported = await api('POST', '/api/v1/devices/week-1/readings', ADMIN, lines.join('\n'), 'text/csv');
    if (imported.status !== 202) throw new Error(`backfill: ${imported.text}`);
    const rows = lines.length - 1;
    await eventually('the week stored', 120_000, async () => {
      const metrics = await api('GET', '/api/v1/devices/week-1/metrics', ADMIN);
      return metrics.json?.data?.[0]?.count >= rows;
    });
    for (const [label, range] of [['1h (raw)', null], ['7d (hourly rollups)', '7d']]) {
      const times = [];
      for (let i = 0; i < 5; i++) {
        const t0 = Date.now();
        await page.goto(BASE + '/#/devices/week-1');
        await page.reload();
        await page.waitForFunction(() => Number(document.querySelector('[data-testid=chart]')?.dataset.points) > 0, null, { timeout: 20_000 });
        if (range) {
          const t1 = Date.now();
          await page.click(`button:has-text("${range}")`);
          await page.waitForFunction(() => /per 1h/.test(document.querySelector('[data-testid=chart-source]')?.textContent ?? ''), null, { timeout: 20_000 });
          times.push(Date.now() - t1);
        } else {
          times.push(Date.now() - t0);
        }
      }
      times.sort((a, b) => a - b);
      console.log(`  MEASURE device page ${label}: median ${times[2]} ms (min ${times[0]}, max ${times[4]}) over ${rows} readings`);
    }
  }
  if (consoleErrors.length) throw new Error(`errors in the page: ${consoleErrors.join('; ')}`);
  console.log('console e2e: every flow passed');
} catch (error) {
  failed = true;
  console.error(`console e2e FAILED: ${error.stack ?? error}`);
  try {
    await page.screenshot({ path: join(tmpdir(), 'fieldline-console-failure.png'), fullPage: true });
    console.error(`  screenshot: ${join(tmpdir(), 'fieldline-console-failure.png')}`);
  } catch {}
} finally {
  await context.close();
  receiver.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
