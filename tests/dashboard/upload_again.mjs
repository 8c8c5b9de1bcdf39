// Scenario: a folder the user already uploaded is chosen again on New job ("Choose folder"); the
// server answers with the existing dataset and the page says it was reused, naming it.
// args: {folder: path}

import {enterKey, run} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);

  await page.click('nav >> text=New job');
  await page.waitForSelector('#dropzone');
  await page.setInputFiles('#upload-folder', args.folder); // a directory: every file under it
  await page.waitForSelector('.upload-status[data-reused]', {timeout: 30_000});
  t.result.reused = await page.getAttribute('.upload-status', 'data-reused');
  t.result.status = await page.textContent('.upload-status');
  t.result.selected_dataset = await page.inputValue('#dataset');
  t.step('uploaded again');
  await t.screenshot('reused');
});
