// Scenario: the server's messages reach the page. Options it refuses show its message next to
// each field named (as they are typed, and again on submit), and no job is made; a job that fails
// at run time shows its error. A wrong key is refused on the key form, and a key the server stops
// accepting sends the browser back to the key form with a message.
// args: {dataset_id, failing_job_id}

import {enterKey, run} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  t.allowConsole(/status of 422 .*@ https?:\/\/[^/]+\/v1\/jobs$/); // the refused submission itself
  t.allowConsole(/status of 401 .*@ https?:\/\/[^/]+\/v1\//); // the wrong keys, on purpose
  await page.goto(`${t.url}/key`);
  await page.fill('#api-key', 'lq_wrong-key');
  await page.click('button[type=submit]');
  t.result.wrong_key_message = await (await page.waitForSelector('#api-key-error:not(:empty)')).textContent();
  await enterKey(t);

  await page.goto(`${t.url}/jobs/new?dataset=${args.dataset_id}`);
  await page.waitForSelector('#advanced');
  await page.selectOption('#base-model', 'tiny-sd');
  await page.click('#advanced > summary');
  await page.fill('#opt-resolution', '30');
  await page.fill('#opt-learning_rate', '0');
  await page.fill('#opt-max_train_steps', '5');
  // checked as typed, before any submit
  t.result.live_resolution_error = await (await page.waitForSelector('#err-resolution:not(:empty)')).textContent();
  t.result.live_learning_rate_error = await page.textContent('#err-learning_rate');
  await page.click('#submit-job');
  const error = await page.waitForSelector('#err-resolution:not(:empty)');
  t.result.resolution_error = await error.textContent();
  t.result.learning_rate_error = await page.textContent('#err-learning_rate');
  t.result.max_train_steps_error = await page.textContent('#err-max_train_steps');
  t.result.resolution_invalid = await page.getAttribute('#opt-resolution', 'aria-invalid');
  t.result.path = new URL(page.url()).pathname;
  await t.screenshot('new-job-errors');

  await page.goto(`${t.url}/jobs/${args.failing_job_id}`);
  await page.waitForSelector('.title-line .state-failed', {timeout: 60_000});
  await page.waitForSelector('.job-error:not([hidden])');
  t.result.failed_error = await page.textContent('.job-error .error-text');
  t.result.failed_retry_visible = await page.isVisible('button:has-text("Retry")');
  await t.screenshot('job-failed');

  await page.evaluate(() => localStorage.setItem('loraq.apiKey', 'lq_revoked-or-wrong'));
  await page.click('nav >> text=Jobs');
  await page.waitForURL(/\/key\?next=/);
  t.result.flash = await page.textContent('.notice.error');
  t.result.key_after_401 = await page.evaluate(() => localStorage.getItem('loraq.apiKey'));
});
