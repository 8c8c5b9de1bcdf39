// The browser side of the dashboard tests: Debian's Chromium driven by playwright-core (no
// browser download), every console error and page error recorded, screenshots of each page at a
// laptop and a phone size. A scenario script ends with one JSON line on stdout, read by pytest.
//
//   node tests/dashboard/<scenario>.mjs <base-url> <api-key> <screenshot-dir> [json-args]

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {chromium} from 'playwright-core';

export const CHROMIUM = process.env.LORAQ_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
export const LAPTOP = {width: 1366, height: 860};
export const PHONE = {width: 390, height: 844};

/**
 * Run `scenario(t)` in a fresh browser profile and print {ok, console_errors, screenshots, ...}.
 * t: {page, url, key, args, step(text), screenshot(name), result, allowConsole(regex)}.
 */
export async function run(scenario) {
  const [url, key, shots, rawArgs] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'loraq-chromium-'));
  fs.mkdirSync(shots, {recursive: true});
  const out = {ok: false, console_errors: [], allowed_console: [], screenshots: [], steps: []};
  // The new-job form asks the server about its options as they change: a refusal there is the
  // feature working (its message goes next to the field), logged by the browser as a failed load.
  const allowed = [/status of 422 .*@ https?:\/\/[^/]+\/v1\/jobs\/validate$/];
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, args: ARGS, viewport: LAPTOP, acceptDownloads: true,
      downloadsPath: path.join(profile, 'downloads'),
    });
    const page = context.pages()[0] ?? await context.newPage();
    page.setDefaultTimeout(20_000);
    page.on('console', (message) => {
      if (message.type() !== 'error') return;
      const entry = `${message.text()} @ ${message.location().url}`;
      (allowed.some((pattern) => pattern.test(entry)) ? out.allowed_console : out.console_errors).push(entry);
    });
    page.on('pageerror', (error) => out.console_errors.push(`pageerror: ${error.stack || error.message}`));
    const t = {
      page, url, key, args: rawArgs ? JSON.parse(rawArgs) : {}, result: out,
      step: (text) => out.steps.push(`${new Date().toISOString().slice(11, 23)} ${text}`),
      allowConsole: (pattern) => allowed.push(pattern),
      screenshot: (name) => screenshots(page, shots, name, out),
    };
    await scenario(t);
    out.ok = true;
  } catch (error) {
    out.error = error.stack || String(error);
    if (context) {
      const page = context.pages()[0];
      if (page) await page.screenshot({path: path.join(shots, 'failure.png'), fullPage: true}).catch(() => {});
    }
  } finally {
    await context?.close().catch(() => {});
    fs.rmSync(profile, {recursive: true, force: true});
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(out.ok ? 0 : 1);
}

/** The page as it is now, full length, at a laptop and at a phone size. */
async function screenshots(page, folder, name, out) {
  for (const [size, viewport] of [['laptop', LAPTOP], ['phone', PHONE]]) {
    await page.setViewportSize(viewport);
    await page.evaluate(() => window.scrollTo(0, 0)); // a sticky top bar would show mid-page
    await page.waitForTimeout(250); // let charts and the layout follow the new width
    const file = path.join(folder, `${name}-${size}.png`);
    await page.screenshot({path: file, fullPage: true});
    out.screenshots.push(file);
  }
  await page.setViewportSize(LAPTOP);
}

/** Enter the key on the key form (where the dashboard sends a browser without one). */
export async function enterKey(t) {
  await t.page.goto(`${t.url}/`);
  await t.page.waitForURL(/\/key/);
  await t.screenshot('key');
  await t.page.fill('#api-key', t.key);
  await t.page.click('button[type=submit]');
  await t.page.waitForURL((u) => !u.pathname.startsWith('/key'));
  t.step('key entered');
}

/** Wait until `probe()` returns a truthy value; returns it. */
export async function until(probe, {timeout = 30_000, interval = 100, what = 'condition'} = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}
