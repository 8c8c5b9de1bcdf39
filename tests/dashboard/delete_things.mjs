// Scenario: delete, always after a confirm dialog. A dataset that jobs still use is refused and
// the server's message shows on its card; a finished job is deleted from its row on the jobs page
// (a first "Cancel" in the dialog keeps it) and another from its own page, which goes back to the
// jobs list; an active job offers no delete; then the dataset goes too.
// args: {dataset_id, list_job_id, page_job_id, active_job_id}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  // The refused delete itself: Chromium logs every 4xx answer to fetch().
  t.allowConsole(new RegExp(`status of 409 .*@ https?://[^/]+/v1/datasets/${args.dataset_id}$`));
  const card = `.dataset-card[data-dataset-id="${args.dataset_id}"]`;
  const row = (id) => `tr[data-job-id="${id}"]`;
  const dialog = 'dialog.confirm[open]';
  await enterKey(t);

  // The dataset, while jobs refer to it: refused, with the server's message on its card.
  await page.click('nav >> text=Datasets');
  await page.click(`${card} button:has-text("Delete")`);
  await page.waitForSelector(dialog);
  t.result.dataset_dialog = await page.textContent(`${dialog} h2`);
  t.result.dialog_focus = await page.evaluate(() => document.activeElement?.textContent);
  await t.screenshot('confirm-dataset');
  await page.click(`${dialog} button[value=confirm]`);
  t.result.in_use_message = await (await page.waitForSelector(`${card} .card-problem:not([hidden])`)).textContent();
  t.step('dataset refused');
  await t.screenshot('dataset-in-use');
  // Its link lists just that dataset's jobs.
  await page.click(`${card} a:has-text("See those jobs")`);
  await page.waitForSelector('#dataset-filter');
  await until(() => page.$$eval('tr[data-job-id]', (rows) => rows.length === 3), {what: "the dataset's three jobs"});
  t.result.filter_label = await page.textContent('#dataset-filter');
  t.result.filtered_path = new URL(page.url()).pathname + new URL(page.url()).search;
  await t.screenshot('jobs-of-dataset');

  // A finished job from its row: Cancel in the dialog keeps it, Delete removes it in place.
  await page.click('nav >> text=Jobs');
  await page.waitForSelector(`${row(args.list_job_id)}[data-state="canceled"]`);
  await page.evaluate(() => { window.__sameDocument = true; });
  await until(() => page.$eval(`${row(args.active_job_id)}`, (tr) => ['queued', 'running'].includes(tr.dataset.state)),
    {what: 'the active job\'s row'});
  t.result.active_delete_visible = await page.isVisible(`${row(args.active_job_id)} button:has-text("Delete")`);
  await page.click(`${row(args.list_job_id)} button:has-text("Delete")`);
  await page.click(`${dialog} button[value=cancel]`);
  await page.waitForSelector(dialog, {state: 'detached'});
  await page.waitForTimeout(300); // nothing may happen: give a wrong delete the time to show
  t.result.kept_after_cancel = await page.isVisible(row(args.list_job_id));
  await page.click(`${row(args.list_job_id)} button:has-text("Delete")`);
  t.result.job_dialog = await page.textContent(`${dialog} h2`);
  await t.screenshot('confirm-job');
  await page.click(`${dialog} button[value=confirm]`);
  await page.waitForSelector(row(args.list_job_id), {state: 'detached'});
  t.step('row gone');
  await page.waitForTimeout(2500); // a poll later, it stays gone
  t.result.row_after_poll = await page.isVisible(row(args.list_job_id));
  t.result.same_document = await page.evaluate(() => window.__sameDocument === true);
  t.result.toast = await page.textContent('.toast');
  await t.screenshot('jobs-after-delete');

  // Another one from its own page: back to the jobs list, and Back does not return to it.
  await page.click(`${row(args.page_job_id)} a.job-title`);
  await page.waitForSelector('.title-line .badge.state-canceled');
  t.result.job_page_delete_visible = await page.isVisible('.page-head button:has-text("Delete")');
  await t.screenshot('job-canceled');
  await page.click('.page-head button:has-text("Delete")');
  await page.click(`${dialog} button[value=confirm]`);
  await page.waitForURL((u) => u.pathname === '/jobs');
  await page.waitForSelector(row(args.active_job_id));
  t.result.page_job_row = await page.isVisible(row(args.page_job_id));
  await page.goBack();
  await page.waitForSelector(row(args.active_job_id));
  t.result.path_after_back = new URL(page.url()).pathname;
  t.step('job deleted from its page');

  // The dataset is no longer used by a finished job, only the active one: still refused. Cancel
  // and delete that one too, then the dataset goes.
  await page.click(`${row(args.active_job_id)} button:has-text("Cancel")`);
  await page.waitForSelector(`${row(args.active_job_id)}[data-state="canceled"]`, {timeout: 30_000});
  await page.click(`${row(args.active_job_id)} button:has-text("Delete")`);
  await page.click(`${dialog} button[value=confirm]`);
  await page.waitForSelector(row(args.active_job_id), {state: 'detached'});
  await page.waitForSelector('.jobs-table[hidden]', {state: 'attached'});
  t.result.empty_jobs = await page.textContent('p.empty');

  await page.click('nav >> text=Datasets');
  await page.click(`${card} button:has-text("Delete")`);
  await page.click(`${dialog} button[value=confirm]`);
  await page.waitForSelector(card, {state: 'detached'});
  t.result.empty_datasets = await page.textContent('p.empty');
  t.step('dataset deleted');
  await t.screenshot('datasets-after-delete');
});
