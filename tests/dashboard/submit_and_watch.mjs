// Scenario: enter the key, drop a dataset zip on New job, submit a tiny-sd job, watch the chart
// gain points and the progress bar advance without a reload, see it succeed with a validation
// image, download the LoRA; then the jobs and datasets pages.
// args: {zip: path, steps: n, options: {...}}

import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);

  await page.click('nav >> text=New job');
  await page.waitForSelector('#dropzone');
  await dropZip(page, args.zip);
  await page.waitForSelector('.upload-result .report', {timeout: 30_000});
  t.result.report = await page.$$eval('.upload-result .report-facts dt', (terms) =>
    Object.fromEntries(terms.map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  t.result.refused = await page.$$eval('.upload-result .refused li', (items) => items.map((li) => li.textContent));
  t.result.selected_dataset = await page.inputValue('#dataset');
  t.step('dataset uploaded');

  await page.selectOption('#base-model', 'tiny-sd');
  await page.click('[data-preset=quick]');
  await page.click('#advanced > summary');
  for (const [name, value] of Object.entries(args.options)) await page.fill(`#opt-${name}`, String(value));
  await page.fill('#job-name', 'browser test');
  await t.screenshot('new-job');

  await page.click('#submit-job');
  await page.waitForURL(/\/jobs\/[0-9a-f]{8,}/);
  t.result.job_id = page.url().split('/').pop();
  await page.evaluate(() => { window.__sameDocument = true; });
  t.step(`submitted ${t.result.job_id}`);

  t.result.observed = await watch(page, args.steps);
  t.step('succeeded');

  await page.waitForSelector('#gallery img[src^="blob:"]');
  t.result.gallery_images = await page.$$eval('#gallery img', (imgs) => imgs.filter((i) => i.complete && i.naturalWidth > 0).length);
  t.result.gallery_steps = await page.$$eval('#gallery .gallery-group', (groups) => groups.map((g) => Number(g.dataset.step)));

  const button = await page.waitForSelector('button[data-artifact="pytorch_lora_weights.safetensors"]');
  const [download] = await Promise.all([page.waitForEvent('download'), button.click()]);
  const saved = path.join(path.dirname(args.zip), 'downloaded.safetensors');
  await download.saveAs(saved);
  t.result.download_name = download.suggestedFilename();
  t.result.download_sha256 = crypto.createHash('sha256').update(fs.readFileSync(saved)).digest('hex');
  t.result.same_document = await page.evaluate(() => window.__sameDocument === true);
  t.result.checkpoint_downloads = await page.$$eval('#downloads button[data-artifact^="checkpoint-"]', (b) => b.length);
  await t.screenshot('job');

  await page.click('nav >> text=Jobs');
  await page.waitForSelector(`tr[data-job-id="${t.result.job_id}"][data-state="succeeded"]`);
  await t.screenshot('jobs');

  await page.click('nav >> text=Datasets');
  await until(() => page.$$eval('.thumbs img', (imgs) => imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0)),
    {what: 'dataset thumbnails'});
  t.result.thumbnails = await page.$$eval('.thumbs img', (imgs) => imgs.length);
  t.result.captions = await page.$$eval('.captions li', (items) => items.length);
  await t.screenshot('datasets');
});

/** Drop the zip on the drop zone as a browser would hand it over (a DataTransfer with a File). */
async function dropZip(page, zipPath) {
  const bytes = fs.readFileSync(zipPath).toString('base64');
  await page.evaluate(({bytes, name}) => {
    const data = Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([data], name, {type: 'application/zip'}));
    const zone = document.getElementById('dropzone');
    for (const type of ['dragenter', 'dragover', 'drop']) {
      zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }
  }, {bytes, name: path.basename(zipPath)});
}

/** Sample the chart's point count, the progress bar and the state until the job succeeds. */
async function watch(page, steps) {
  const seen = [];
  await until(async () => {
    const now = await page.evaluate(() => ({
      points: Number(document.getElementById('loss-chart')?.dataset.points ?? 0),
      lr_points: Number(document.getElementById('lr-chart')?.dataset.points ?? 0),
      progress: Number(document.querySelector('.progress.large')?.getAttribute('aria-valuenow') ?? 0),
      state: document.querySelector('.title-line .badge')?.textContent ?? '',
    }));
    const last = seen[seen.length - 1];
    if (!last || last.points !== now.points || last.progress !== now.progress || last.state !== now.state) seen.push(now);
    if (now.state === 'failed' || now.state === 'canceled') throw new Error(`job ended ${now.state}`);
    return now.state === 'succeeded' && now.points >= steps;
  }, {timeout: 120_000, interval: 100, what: 'the job to succeed'});
  return seen;
}
