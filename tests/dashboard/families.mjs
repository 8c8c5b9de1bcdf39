// Scenario: the new-job form offers only the chosen model's family's options. With tiny-sd the
// form is SD's; picking tiny-sdxl rebuilds it from SDXL's schema (its VAE option appears, the
// values typed so far stay, the quick preset's size follows). A tiny-sdxl job is submitted from
// the form and watched to the end; its page names the family. Then the flow-matching families:
// tiny-flux and tiny-sd3 rebuild the form from their schemas. Screenshots of the form per family.
// args: {dataset_id, steps}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);

  await page.goto(`${t.url}/jobs/new?dataset=${args.dataset_id}`);
  await page.waitForSelector('#advanced');
  await page.selectOption('#base-model', 'tiny-sd');
  await page.click('#advanced > summary');
  await page.waitForSelector('.options[data-family="sd"]');
  t.result.sd = await formFacts(page);
  await t.screenshot('new-job-sd');

  await page.click('[data-preset=quick]');
  await page.fill('#opt-max_train_steps', String(args.steps));
  await page.fill('#opt-rank', '2');
  await page.selectOption('#base-model', 'tiny-sdxl');
  await page.waitForSelector('.options[data-family="sdxl"]');
  t.result.sdxl = await formFacts(page);
  t.result.kept = {max_train_steps: await page.inputValue('#opt-max_train_steps'),
    rank: await page.inputValue('#opt-rank'), resolution: await page.inputValue('#opt-resolution')};
  await page.fill('#opt-validation_steps', String(args.steps));
  await page.fill('#opt-train_batch_size', '2');
  await page.fill('#job-name', 'sdxl from the form');
  // the server's verdict on these options (an earlier one, from before the edits, may still show)
  await until(async () => (await page.textContent('#validation')).includes(`Looks good: ${args.steps} steps`),
    {what: 'the server accepting the options'});
  t.result.verdict = await page.textContent('#validation');
  await t.screenshot('new-job-sdxl');

  await page.click('#submit-job');
  await page.waitForURL(/\/jobs\/[0-9a-f]{8,}/);
  t.result.job_id = page.url().split('/').pop();
  t.step(`submitted ${t.result.job_id}`);
  await page.waitForSelector('.title-line .state-succeeded', {timeout: 180_000});
  t.result.facts = await page.$$eval('.facts dt', (terms) =>
    Object.fromEntries(terms.map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  await t.screenshot('job-sdxl');

  // the flow-matching families' forms, from their own schemas
  await page.goto(`${t.url}/jobs/new?dataset=${args.dataset_id}`);
  await page.waitForSelector('#advanced');
  await page.click('#advanced > summary');
  for (const [model, family] of [['tiny-flux', 'flux'], ['tiny-sd3', 'sd3']]) {
    await page.selectOption('#base-model', model);
    await page.waitForSelector(`.options[data-family="${family}"]`);
    t.result[family] = await formFacts(page);
    await t.screenshot(`new-job-${family}`);
  }
});

/** The form's family, its model note and which options it offers. */
async function formFacts(page) {
  return {
    family: await page.getAttribute('.options', 'data-family'),
    note: await page.textContent('#model-family'),
    options: await page.$$eval('.options [data-option]', (fields) => fields.map((f) => f.dataset.option)),
  };
}
