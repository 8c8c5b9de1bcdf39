// Scenario: the database goes away while the jobs page is open. The page keeps what it showed,
// a "service unavailable, retrying" notice naming the database appears (no error page, also on
// a page opened during the outage), and once the database is back the notice goes and the
// pages fill in by themselves. pytest stops and starts the database: the two sides meet through
// files in args.control (ready -> stopped -> seen -> started).
// args: {control, job_id}

import fs from 'node:fs';
import path from 'node:path';

import {enterKey, run, until} from './harness.mjs';

const mark = (dir, name) => fs.writeFileSync(path.join(dir, name), '');
const marked = (dir, name) => fs.existsSync(path.join(dir, name));

run(async (t) => {
  const {page, args} = t;
  // The outage is this test's doing: the browser logs each 503 it gets as a failed load.
  t.allowConsole(/status of 503/);
  const row = `tr[data-job-id="${args.job_id}"]`;
  await enterKey(t);
  await page.waitForSelector(`${row}[data-state="succeeded"]`);
  await page.evaluate(() => { window.__sameDocument = true; });

  mark(args.control, 'ready');
  await until(() => marked(args.control, 'stopped'), {timeout: 60_000, what: 'the database to stop'});
  t.step('database stopped');
  await page.waitForSelector('#outage:not([hidden])', {timeout: 20_000});
  t.step('notice shown');
  t.result.notice = await page.textContent('#outage');
  t.result.row_kept = await page.isVisible(row);
  t.result.errors_shown = await page.$$eval('.notice.error', (nodes) => nodes.filter((node) => node.offsetParent !== null).map((node) => node.textContent));
  await t.screenshot('jobs-outage');

  // A page opened during the outage waits with the notice instead of failing.
  await page.click(`${row} a.job-title`);
  await page.waitForTimeout(3000);
  t.result.job_page_errors = await page.$$eval('.notice.error', (nodes) => nodes.filter((node) => node.offsetParent !== null).map((node) => node.textContent));
  t.result.notice_on_job_page = await page.isVisible('#outage');
  await t.screenshot('job-outage');
  mark(args.control, 'seen');

  await until(() => marked(args.control, 'started'), {timeout: 60_000, what: 'the database to start'});
  await page.waitForSelector('#outage', {state: 'hidden', timeout: 30_000});
  t.step('notice gone');
  await page.waitForSelector('.title-line .badge.state-succeeded', {timeout: 30_000});
  t.result.same_document = await page.evaluate(() => window.__sameDocument === true);
  await t.screenshot('job-after-outage');
});
