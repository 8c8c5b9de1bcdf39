// Scenario: a finished job that measured validation loss: its page's loss chart has a
// "validation loss" line (the legend shows its last value) and the facts name the best checkpoint.
// args: {job_id, steps}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);
  await page.goto(`${t.url}/jobs/${args.job_id}`);
  await until(() => page.$eval('#loss-chart', (c, steps) => Number(c.dataset.points) === steps, args.steps),
    {what: 'every step drawn'});
  await page.waitForSelector('#loss-chart .u-legend .u-series');
  t.result.legend = await page.$$eval('#loss-chart .u-legend .u-series', (rows) => rows.map((row) => [
    row.querySelector('.u-label')?.textContent, row.querySelector('.u-value')?.textContent]));
  t.result.facts = await page.$$eval('.facts dt', (dts) => Object.fromEntries(dts.map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  await t.screenshot('validation-loss');
});
