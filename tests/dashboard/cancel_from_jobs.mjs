// Scenario: a running job, filtered by state on the jobs page, is canceled with its row's button;
// the row follows it to canceled without a reload, and its page then offers a retry.
// args: {job_id}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  const row = `tr[data-job-id="${args.job_id}"]`;
  await enterKey(t);

  await page.click('.filters >> text=Running');
  await page.waitForURL(/state=running/);
  await page.waitForSelector(`${row}[data-state="running"]`);
  await until(() => page.$eval(`${row} .progress`, (bar) => Number(bar.getAttribute('aria-valuenow')) > 0),
    {what: 'the row to show progress'});
  await until(() => page.$eval(`${row} td[data-label="ETA"]`, (cell) => cell.textContent !== '—'), {what: 'an ETA'});
  t.result.eta_text = await page.$eval(`${row} td[data-label="ETA"]`, (cell) => cell.textContent);
  await page.evaluate(() => { window.__sameDocument = true; });
  await t.screenshot('jobs-running');

  await page.click('.filters >> text=All');
  await page.click(`${row} button:has-text("Cancel")`);
  t.step('cancel clicked');
  await page.waitForSelector(`${row}[data-state="canceled"]`, {timeout: 30_000});
  t.step('row shows canceled');
  t.result.cancel_visible = await page.isVisible(`${row} button:has-text("Cancel")`);
  t.result.retry_visible = await page.isVisible(`${row} button:has-text("Retry")`);
  t.result.same_document = await page.evaluate(() => window.__sameDocument === true);
  await t.screenshot('jobs-canceled');

  await page.click(`${row} a.job-title`);
  await page.waitForSelector('.title-line .badge.state-canceled');
  t.result.job_page_retry_visible = await page.isVisible('button:has-text("Retry")');
  await t.screenshot('job-canceled');
});
