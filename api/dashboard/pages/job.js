// Job detail: the live loss chart (raw and smoothed) and learning rate on a step axis; step,
// epoch, images/s and ETA; validation images by step as they arrive; downloads; the config; the
// error of a failed job; cancel, retry and delete. Everything live comes from the job's event stream.

import {get, isAbort, post} from '../api.js';
import {lineChart, smooth} from '../chart.js';
import {h, progressBar, replace, stateBadge, toast} from '../dom.js';
import * as fmt from '../format.js';
import {followJobEvents} from '../sse.js';
import {FINAL_STATES, canCancel, canDelete, canRetry, deleteJob, errorNotice, jobAction, jobTitle} from './common.js';
import {configTable, downloadsList, sampleGallery} from './job-parts.js';

const DRAW_MS = 150;

export function jobPage(main, ctx) {
  const jobId = decodeURIComponent(ctx.params[0]);
  const urls = []; // object URLs of images, revoked on leaving
  ctx.onLeave(() => urls.forEach((url) => URL.revokeObjectURL(url)));

  const view = layout(main);
  const lossChart = lineChart(view.loss, {y: 'loss', series: [
    {label: 'loss', stroke: 'rgba(37, 99, 235, 0.35)', width: 1},
    {label: 'smoothed', stroke: '#1d4ed8', width: 2.5},
    {label: 'validation loss', stroke: '#dc2626', width: 2}]});
  const lrChart = lineChart(view.lr, {y: 'learning rate', height: 180, series: [
    {label: 'learning rate', stroke: '#0f766e', width: 2}]});
  const gallery = sampleGallery(view.gallery, jobId, urls, ctx.signal);
  const downloads = downloadsList(view.downloads, jobId);
  ctx.onLeave(() => { lossChart.destroy(); lrChart.destroy(); });

  let job = null;
  let latest = null; // the newest step event
  let preparing = null; // the newest `prepare` event's data while the latent cache encodes up front
  let datasetInfo = null; // a promise of the job's dataset, asked once
  const points = {steps: [], loss: [], lr: [], validation: []};
  let stream = null;
  const timers = {};
  ctx.onLeave(() => { stream?.close(); Object.values(timers).forEach(clearTimeout); });

  const later = (name, fn, ms) => {
    if (!timers[name]) timers[name] = setTimeout(() => { timers[name] = null; fn(); }, ms);
  };

  async function loadJob() {
    try {
      job = await get(`/v1/jobs/${encodeURIComponent(jobId)}`, {signal: ctx.signal});
      showJob();
      return true;
    } catch (error) {
      if (!isAbort(error)) replace(view.problem, errorNotice(error));
      return false;
    }
  }

  async function loadArtifacts() {
    try {
      downloads.show(await get(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`, {signal: ctx.signal}));
    } catch (error) {
      if (!isAbort(error)) downloads.fail(error);
    }
  }

  function follow() {
    stream?.close();
    stream = followJobEvents(jobId, {
      after: stream ? stream.last() : 0,
      onEvent,
      onStatus: (status) => { view.live.dataset.status = status; view.live.textContent = LIVE_TEXT[status]; },
      onError: (error) => replace(view.problem, errorNotice(error)),
    });
  }

  function onEvent(event) {
    const data = event.data || {};
    if (event.type === 'step') {
      addPoint(data);
      latest = data;
      later('draw', draw, DRAW_MS);
    } else if (event.type === 'prepare') {
      const progress = data.data || {};
      preparing = progress.mode === 'upfront' && progress.done < progress.total ? {...data, ...progress} : null;
      later('draw', draw, DRAW_MS);
    } else if (event.type === 'log' && data.validation_loss != null) {
      // The held-out loss at a step already drawn (trainer/validation_loss.py): its own line.
      const index = points.steps.lastIndexOf(data.step);
      if (index >= 0) points.validation[index] = data.validation_loss;
      later('draw', draw, DRAW_MS);
    } else if (event.type === 'log' && Number.isInteger(data.step)) {
      truncate(data.step); // an attempt (re)starts here: later steps are retrained
      later('draw', draw, DRAW_MS);
    } else if (event.type === 'state') {
      if (job) job.state = data.state;
      later('job', loadJob, 250);
      if (FINAL_STATES.has(data.state)) later('artifacts', loadArtifacts, 250);
    } else if (event.type === 'sample') {
      gallery.add(data.step, data.artifacts || []);
      later('artifacts', loadArtifacts, 500);
    } else if (event.type === 'checkpoint' || event.type === 'done') {
      later('artifacts', loadArtifacts, 500);
    }
  }

  function addPoint(data) {
    truncate(data.step - 1);
    points.steps.push(data.step);
    points.loss.push(data.loss ?? null);
    points.lr.push(data.lr ?? null);
    points.validation.push(null);
  }

  function truncate(step) {
    let keep = points.steps.length;
    while (keep > 0 && points.steps[keep - 1] > step) keep -= 1;
    for (const list of Object.values(points)) list.length = keep;
  }

  function draw() {
    lossChart.set(points.steps, points.loss, smooth(points.loss), points.validation);
    lrChart.set(points.steps, points.lr);
    showStats();
  }

  function showJob() {
    view.title.textContent = jobTitle(job);
    document.title = `${jobTitle(job)} · loraq`;
    replace(view.badge, stateBadge(job.state));
    view.cancel.hidden = !canCancel(job);
    view.retry.hidden = !canRetry(job);
    view.remove.hidden = !canDelete(job);
    view.saveNow.hidden = job.state !== 'running';
    view.sampleNow.hidden = job.state !== 'running' || !job.config?.validation_prompt;
    view.error.hidden = !job.error;
    view.errorText.textContent = job.error || '';
    replace(view.config, configTable(job.config));
    if (!job.config?.validation_prompt) gallery.expectNone();
    showStats();
    showFacts();
  }

  function showStats() {
    if (!job) return;
    const total = latest?.total_steps ?? job.total_steps;
    const step = job.state === 'succeeded' ? Math.max(job.step, latest?.step ?? 0) : Math.max(latest?.step ?? 0, job.step);
    const running = job.state === 'running';
    if (preparing && running && !latest) { // the latent cache encodes before the first step
      view.progress.set(preparing.done, preparing.total, `encoding latents ${preparing.done} / ${preparing.total}`, job.state);
      view.stats.speed.textContent = preparing.images_per_s ? `${fmt.number(preparing.images_per_s, 3)} images/s` : '—';
      view.stats.eta.textContent = fmt.duration(preparing.eta_s);
      return;
    }
    view.progress.set(step, total, `${step} / ${total} steps`, job.state);
    view.stats.step.textContent = `${step} / ${total}`;
    view.stats.epoch.textContent = latest?.epoch ?? '—';
    view.stats.speed.textContent = latest?.images_per_s ? `${fmt.number(latest.images_per_s, 3)} images/s` : '—';
    view.stats.eta.textContent = running ? fmt.duration(latest?.eta_s) : job.state === 'queued' && job.queue_position
      ? `queued, #${job.queue_position}` : '—';
    view.stats.loss.textContent = fmt.number(latest?.loss ?? job.last_loss);
  }

  async function showFacts() {
    const facts = [['Base model', job.base_model], ['Family', job.config?.family ?? 'sd'], ['Attempt', job.attempt], ['Worker', job.worker || '—'],
      ['Queued', fmt.dateTime(job.queued_at)], ['Started', fmt.dateTime(job.started_at)],
      ['Finished', fmt.dateTime(job.finished_at)], ['Job id', job.id],
      ...(job.best_checkpoint ? [['Best checkpoint', job.best_checkpoint.split('/')[0]]] : [])];
    const datasetCell = h('dd', {text: fmt.shortId(job.dataset_id)});
    replace(view.facts, h('dt', {text: 'Dataset'}), datasetCell,
      facts.flatMap(([label, value]) => [h('dt', {text: label}), h('dd', {text: String(value)})]));
    datasetInfo ??= get(`/v1/datasets/${encodeURIComponent(job.dataset_id)}`, {signal: ctx.signal})
      .catch(() => null); // deleted or unreachable: the id stays
    const dataset = await datasetInfo;
    if (dataset) replace(datasetCell, h('a', {href: '/datasets', text: dataset.name}), ` · ${dataset.image_count} images`);
  }

  async function act(action, button) {
    button.disabled = true;
    const updated = await jobAction(job, action);
    button.disabled = false;
    if (!updated) return;
    job = updated;
    showJob();
    if (action === 'retry') follow(); // the old stream ended with the job; resume after its last event
  }
  view.cancel.addEventListener('click', () => act('cancel', view.cancel));
  // Save now / sample now: served at the job's next step; the checkpoint and images then arrive
  // on the event stream like scheduled ones (downloads, gallery).
  async function askNow(action, button) {
    button.disabled = true;
    try {
      const answer = await post(`/v1/jobs/${encodeURIComponent(job.id)}/${action}`);
      toast(`${jobTitle(job)}: ${answer.message}`);
    } catch (error) {
      if (!isAbort(error)) toast(`Could not ${action === 'checkpoint' ? 'save a checkpoint' : 'sample'}: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  }
  view.saveNow.addEventListener('click', () => askNow('checkpoint', view.saveNow));
  view.sampleNow.addEventListener('click', () => askNow('sample', view.sampleNow));
  view.retry.addEventListener('click', () => act('retry', view.retry));
  view.remove.addEventListener('click', async () => {
    view.remove.disabled = true;
    const deleted = await deleteJob(job, ctx.signal);
    view.remove.disabled = false;
    if (deleted && !ctx.signal.aborted) ctx.navigate('/jobs', {replace: true}); // Back must not lead to a 404
    else if (!deleted) loadJob(); // refused (409): it is active again, show it as it is
  });

  loadJob().then((found) => {
    if (!found) return;
    loadArtifacts();
    follow();
  });
}

const LIVE_TEXT = {live: '● live', reconnecting: '○ reconnecting…', ended: 'finished'};

function layout(main) {
  const stat = (label) => {
    const value = h('span', {class: 'stat-value', text: '—'});
    return [h('div', {class: 'stat'}, h('span', {class: 'stat-label', text: label}), value), value];
  };
  const [step, stepValue] = stat('Step');
  const [epoch, epochValue] = stat('Epoch');
  const [speed, speedValue] = stat('Speed');
  const [eta, etaValue] = stat('ETA');
  const [loss, lossValue] = stat('Last loss');
  const view = {
    title: h('h1', {text: 'Job'}),
    badge: h('span'),
    live: h('span', {class: 'live muted small', 'aria-live': 'polite'}),
    saveNow: h('button', {type: 'button', id: 'save-now', text: 'Save checkpoint now', hidden: true}),
    sampleNow: h('button', {type: 'button', id: 'sample-now', text: 'Sample now', hidden: true}),
    cancel: h('button', {type: 'button', text: 'Cancel', hidden: true}),
    retry: h('button', {type: 'button', text: 'Retry', hidden: true}),
    remove: h('button', {type: 'button', class: 'danger', text: 'Delete', hidden: true}),
    problem: h('div'),
    errorText: h('pre', {class: 'error-text'}),
    progress: progressBar(),
    stats: {step: stepValue, epoch: epochValue, speed: speedValue, eta: etaValue, loss: lossValue},
    loss: h('div', {class: 'chart', id: 'loss-chart'}),
    lr: h('div', {class: 'chart', id: 'lr-chart'}),
    gallery: h('div', {class: 'gallery', id: 'gallery'}),
    downloads: h('div', {id: 'downloads'}),
    facts: h('dl', {class: 'facts'}),
    config: h('div', {class: 'config'}),
  };
  view.error = h('div', {class: 'notice error job-error', role: 'alert', hidden: true},
    h('strong', {text: 'The job failed'}), view.errorText);
  view.progress.classList.add('large');
  main.append(
    h('p', {class: 'crumbs'}, h('a', {href: '/jobs', text: '← Jobs'})),
    h('div', {class: 'page-head'}, h('div', {class: 'title-line'}, view.title, view.badge, view.live),
      h('div', {class: 'actions'}, view.saveNow, view.sampleNow, view.cancel, view.retry, view.remove)),
    view.problem, view.error,
    h('section', {class: 'card'}, view.progress, h('div', {class: 'stats'}, step, epoch, speed, eta, loss)),
    h('div', {class: 'grid-2'},
      h('section', {class: 'card'}, h('h2', {text: 'Loss'}), view.loss),
      h('section', {class: 'card'}, h('h2', {text: 'Learning rate'}), view.lr)),
    h('section', {class: 'card'}, h('h2', {text: 'Validation images'}), view.gallery),
    h('div', {class: 'grid-2'},
      h('section', {class: 'card'}, h('h2', {text: 'Downloads'}), view.downloads),
      h('section', {class: 'card'}, h('h2', {text: 'Job'}), view.facts)),
    h('section', {class: 'card'}, h('details', {open: true}, h('summary', {}, h('h2', {text: 'Configuration'})), view.config)),
  );
  return view;
}
