// Scenario: the workers page (from its nav link) lists the test's worker with its queue, GPU
// class and the running job (a link to its page), and keeps its heartbeat fresh by polling.
// args: {queue, job_id}

import {enterKey, run, until} from './harness.mjs';

run(async (t) => {
  const {page, args} = t;
  await enterKey(t);
  await page.click('nav >> text=Workers');
  await page.waitForURL(/\/workers$/);
  // Other tests' workers may share the Redis: this test's row is the one on its own queue.
  const row = await until(async () => {
    for (const candidate of await page.$$('tr[data-worker]')) {
      if ((await candidate.$eval('td:nth-child(3)', (cell) => cell.textContent)) === args.queue) return candidate;
    }
    return null;
  }, {what: "the test worker's row"});
  const cells = await row.$$eval('td', (tds) => tds.map((td) => td.textContent));
  t.result.cells = cells;
  t.result.job_link = await row.$eval('a', (a) => a.getAttribute('href')).catch(() => null);
  t.result.nav_active = await page.$eval('nav a[data-nav="workers"]', (a) => a.classList.contains('active'));
  await t.screenshot('workers');
  await page.click(`tr[data-worker] a[href="/jobs/${args.job_id}"]`);
  await page.waitForURL(new RegExp(`/jobs/${args.job_id}$`));
  t.result.job_page = true;
});
