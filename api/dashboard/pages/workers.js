// Workers: each live worker (its heartbeat), its host, queue, GPU class, current job and last
// heartbeat, polled every 2 s. A job's id shows to admins and to the job's owner (the server
// decides); others see a busy worker without it.

import {get, isAbort} from '../api.js';
import {h, replace, stateBadge} from '../dom.js';
import * as fmt from '../format.js';
import {errorNotice} from './common.js';

const POLL_MS = 2000;

export function workersPage(main, ctx) {
  const body = h('tbody');
  const table = h('table', {class: 'jobs-table workers-table'},
    h('thead', {}, h('tr', {}, ['Worker', 'Host', 'Queue', 'GPU class', 'Current job', 'Last heartbeat', 'Up since']
      .map((label) => h('th', {scope: 'col', text: label})))), body);
  const empty = h('p', {class: 'empty', hidden: true, text: 'No worker is running: start one with `make worker`.'});
  const problem = h('div');
  main.append(h('div', {class: 'page-head'}, h('h1', {text: 'Workers'})), problem,
    h('div', {class: 'table-wrap'}, table), empty);

  let timer = null;
  ctx.onLeave(() => clearTimeout(timer));

  async function refresh() {
    try {
      const workers = await get('/v1/workers', {signal: ctx.signal});
      replace(body, ...workers.map(row));
      empty.hidden = workers.length > 0;
      table.hidden = workers.length === 0;
      problem.replaceChildren();
    } catch (error) {
      if (isAbort(error)) return;
      replace(problem, errorNotice(error));
    }
    if (!ctx.signal.aborted) timer = setTimeout(refresh, POLL_MS);
  }
  refresh();
}

function row(worker) {
  const job = worker.current_job;
  let current;
  if (job) {
    current = h('span', {}, h('a', {href: `/jobs/${encodeURIComponent(job.id)}`, class: 'mono', text: fmt.shortId(job.id)}),
      ' ', stateBadge(job.state), h('span', {class: 'muted small', text: ` step ${job.step}/${job.total_steps}`}));
  } else {
    current = h('span', {class: 'muted', text: worker.busy ? 'busy (another owner’s job)' : 'idle'});
  }
  return h('tr', {dataset: {worker: worker.name}},
    h('td', {class: 'mono', dataset: {label: 'Worker'}, text: worker.name}),
    h('td', {dataset: {label: 'Host'}, text: worker.host || ''}),
    h('td', {class: 'mono', dataset: {label: 'Queue'}, text: worker.queue || ''}),
    h('td', {class: 'mono', dataset: {label: 'GPU class'}, text: worker.gpu_class}),
    h('td', {dataset: {label: 'Current job'}}, current),
    h('td', {dataset: {label: 'Last heartbeat'}, title: fmt.dateTime(worker.last_heartbeat), text: secondsAgo(worker.last_heartbeat)}),
    h('td', {dataset: {label: 'Up since'}, title: worker.started_at ? fmt.dateTime(worker.started_at) : '', text: worker.started_at ? fmt.age(worker.started_at) : ''}));
}

/** Heartbeats come every few seconds: "4 s ago" says more than "just now". */
function secondsAgo(iso) {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  return seconds < 120 ? `${seconds} s ago` : fmt.age(iso);
}
