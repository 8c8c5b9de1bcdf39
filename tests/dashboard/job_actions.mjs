// Scenario: on a running job's page, "Save checkpoint now" and "Sample now" are clicked; a
// checkpoint download and a validation image appear on the page at the job's next steps, live.
// args: {job_id}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);
  await page.goto(`${t.url}/jobs/${args.job_id}`);
  await page.waitForSelector('.title-line .badge.state-running');
  await page.waitForSelector('#save-now:visible');
  await page.waitForSelector('#sample-now:visible');
  t.result.checkpoints_before = await page.$$eval('#downloads button[data-artifact^="checkpoint-"]', (b) => b.length);
  t.result.images_before = await page.$$eval('#gallery img', (imgs) => imgs.length);
  await page.evaluate(() => { window.__sameDocument = true; });

  await page.click('#save-now');
  t.step('save now clicked');
  await page.click('#sample-now');
  t.step('sample now clicked');
  await until(() => page.$$eval('#downloads button[data-artifact^="checkpoint-"]', (b) => b.length > 0),
    {timeout: 90_000, what: 'a checkpoint download'});
  t.step('checkpoint offered');
  await page.waitForSelector('#gallery img[src^="blob:"]', {timeout: 90_000});
  t.step('image shown');
  t.result.checkpoint_names = await page.$$eval('#downloads button[data-artifact^="checkpoint-"]',
    (b) => b.map((x) => x.dataset.artifact));
  t.result.gallery_steps = await page.$$eval('#gallery .gallery-group', (groups) => groups.map((g) => Number(g.dataset.step)));
  t.result.same_document = await page.evaluate(() => window.__sameDocument === true);
  await t.screenshot('job-actions');
});
