// Jobs: every job with its state, progress, last loss, ETA, base model, dataset and age,
// polled every 2 s (rows update in place), filtered by state, with cancel, retry and delete.

import {get, isAbort} from '../api.js';
import {h, progressBar, replace} from '../dom.js';
import * as fmt from '../format.js';
import {STATES, canCancel, canDelete, canRetry, datasetNames, deleteJob, errorNotice, jobAction, jobTitle} from './common.js';

const POLL_MS = 2000;
const PAGE = 50;

export function jobsPage(main, ctx) {
  const state = STATES.includes(ctx.query.get('state')) ? ctx.query.get('state') : '';
  const dataset = ctx.query.get('dataset') || ''; // only this dataset's jobs (from the datasets page)
  let limit = PAGE;
  const rows = new Map(); // job id -> row
  const names = datasetNames(ctx.signal);

  const body = h('tbody');
  const table = h('table', {class: 'jobs-table'},
    h('thead', {}, h('tr', {}, ['Job', 'State', 'Progress', 'Last loss', 'ETA', 'Base model', 'Dataset', 'Age', '']
      .map((label) => h('th', {scope: 'col', text: label})))), body);
  const empty = h('p', {class: 'empty', hidden: true});
  const footer = h('div', {class: 'list-footer'});
  const problem = h('div');

  main.append(
    h('div', {class: 'page-head'}, h('h1', {text: 'Jobs'}), h('a', {class: 'button primary', href: '/jobs/new', text: 'New job'})),
    filters(state, dataset),
    dataset ? datasetFilter(dataset, state, names) : '',
    problem,
    h('div', {class: 'table-wrap'}, table),
    empty,
    footer,
  );

  let timer = null;
  let stopped = false;
  let latest = 0; // the newest refresh: an older one still in flight (a poll during an action) drops its answer
  ctx.onLeave(() => {
    stopped = true;
    clearTimeout(timer);
  });

  async function refresh() {
    clearTimeout(timer);
    const ticket = ++latest;
    try {
      const query = new URLSearchParams({limit: String(limit)});
      if (state) query.set('state', state);
      if (dataset) query.set('dataset_id', dataset);
      const page = await get(`/v1/jobs?${query}`, {signal: ctx.signal});
      await names.ensure(page.items.map((job) => job.dataset_id));
      if (ticket !== latest) return;
      show(page);
      problem.replaceChildren();
    } catch (error) {
      if (isAbort(error) || ticket !== latest) return;
      replace(problem, errorNotice(error));
    }
    if (!stopped) timer = setTimeout(refresh, POLL_MS);
  }

  function show(page) {
    const now = Date.now();
    const seen = new Set();
    page.items.forEach((job, index) => {
      seen.add(job.id);
      let row = rows.get(job.id);
      if (!row) {
        row = jobRow(job, () => refresh(), ctx.signal);
        rows.set(job.id, row);
      }
      row.update(job, {eta: job.eta_s, dataset: names.name(job.dataset_id), now});
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] ?? null);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.remove();
        rows.delete(id);
      }
    }
    empty.hidden = page.total > 0;
    empty.textContent = state ? `No ${state} jobs.` : 'No jobs yet. Start one with New job.';
    table.hidden = page.total === 0;
    replace(footer, 
      h('span', {class: 'muted', text: `${page.items.length} of ${page.total} jobs · updated ${new Date().toLocaleTimeString()}`}),
      page.total > page.items.length && limit < 200
        ? h('button', {type: 'button', text: 'Show more', onclick: () => { limit = Math.min(limit + PAGE, 200); refresh(); }})
        : null,
    );
  }

  refresh();
}

function jobsUrl(state, dataset) {
  const query = new URLSearchParams();
  if (state) query.set('state', state);
  if (dataset) query.set('dataset', dataset);
  return query.size ? `/jobs?${query}` : '/jobs';
}

/** "Dataset: pets ×": the list shows one dataset's jobs; the × shows every dataset's again. */
function datasetFilter(dataset, state, names) {
  const label = h('span', {text: `Dataset: ${dataset.slice(0, 8)}…`});
  names.ensure([dataset]).then(() => { if (names.name(dataset)) label.textContent = `Dataset: ${names.name(dataset)}`; });
  return h('p', {class: 'filters', id: 'dataset-filter'},
    h('span', {class: 'chip active'}, label, ' ', h('a', {href: jobsUrl(state, ''), 'aria-label': 'Show every dataset', text: '×'})));
}

function filters(current, dataset) {
  const link = (value, label) => h('a', {
    href: jobsUrl(value, dataset), class: `chip${value === current ? ' active' : ''}`,
    'aria-current': value === current ? 'page' : null, text: label,
  });
  return h('nav', {class: 'filters', 'aria-label': 'Filter by state'},
    link('', 'All'), STATES.map((value) => link(value, value[0].toUpperCase() + value.slice(1))));
}

/** A table row that updates in place, so a button keeps its place between polls. */
function jobRow(job, changed, signal) {
  const title = h('a', {class: 'job-title', href: `/jobs/${job.id}`});
  const sub = h('span', {class: 'muted small mono', text: fmt.shortId(job.id)});
  const badge = h('span');
  const extra = h('span', {class: 'muted small'});
  const bar = progressBar();
  const cells = {loss: h('td', {class: 'num', dataset: {label: 'Last loss'}}), eta: h('td', {dataset: {label: 'ETA'}}),
    model: h('td', {dataset: {label: 'Base model'}}), dataset: h('td', {dataset: {label: 'Dataset'}}),
    age: h('td', {dataset: {label: 'Age'}})};
  const cancel = h('button', {type: 'button', class: 'small', text: 'Cancel'});
  const retry = h('button', {type: 'button', class: 'small', text: 'Retry'});
  const remove = h('button', {type: 'button', class: 'small danger', text: 'Delete'});
  let current = job;
  const act = (action, button) => async () => {
    button.disabled = true;
    const updated = await jobAction(current, action);
    button.disabled = false;
    if (updated) changed();
  };
  cancel.addEventListener('click', act('cancel', cancel));
  retry.addEventListener('click', act('retry', retry));
  remove.addEventListener('click', async () => {
    remove.disabled = true;
    const deleted = await deleteJob(current, signal);
    remove.disabled = false;
    if (deleted) row.remove(); // at once; the refresh drops it from the list and the count
    changed();
  });

  const row = h('tr', {dataset: {jobId: job.id}},
    h('td', {class: 'job-cell', dataset: {label: 'Job'}}, title, sub),
    h('td', {dataset: {label: 'State'}}, badge, extra),
    h('td', {class: 'progress-cell', dataset: {label: 'Progress'}}, bar),
    cells.loss, cells.eta, cells.model, cells.dataset, cells.age,
    h('td', {class: 'row-actions'}, cancel, retry, remove));

  row.update = (next, {eta: etaSeconds, dataset, now}) => {
    current = next;
    row.dataset.state = next.state;
    title.textContent = jobTitle(next);
    badge.className = `badge state-${next.state}`;
    badge.textContent = next.state;
    extra.textContent = next.queue_position ? ` #${next.queue_position} in queue` : next.attempt > 1 ? ` attempt ${next.attempt}` : '';
    bar.set(next.step, next.total_steps, `${next.step} / ${next.total_steps}`, next.state);
    cells.loss.textContent = fmt.number(next.last_loss);
    cells.eta.textContent = next.state === 'running' ? fmt.duration(etaSeconds) : '—';
    cells.model.textContent = next.base_model;
    cells.dataset.textContent = dataset || fmt.shortId(next.dataset_id);
    cells.dataset.title = next.dataset_id;
    cells.age.textContent = fmt.age(next.queued_at, now);
    cells.age.title = fmt.dateTime(next.queued_at);
    cancel.hidden = !canCancel(next);
    retry.hidden = !canRetry(next);
    remove.hidden = !canDelete(next);
    remove.setAttribute('aria-label', `Delete ${jobTitle(next)}`);
  };
  return row;
}
