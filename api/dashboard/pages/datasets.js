// Datasets: each with its thumbnails, image and caption counts and a caption preview, and a
// delete (refused while a job refers to it: the server's message shows on the card).

import {get, getAll, imageUrl, isAbort, request} from '../api.js';
import {confirmDialog, h, replace, toast} from '../dom.js';
import * as fmt from '../format.js';
import {errorNotice} from './common.js';
import {reportSummary} from './report.js';

const PARALLEL = 4; // detail requests at once

export async function datasetsPage(main, ctx) {
  const urls = [];
  ctx.onLeave(() => urls.forEach((url) => URL.revokeObjectURL(url)));
  const list = h('div', {class: 'dataset-list'});
  main.append(
    h('div', {class: 'page-head'}, h('h1', {text: 'Datasets'}),
      h('a', {class: 'button primary', href: '/jobs/new', text: 'Upload in New job'})),
    list);

  let datasets;
  try {
    datasets = await getAll('/v1/datasets', {signal: ctx.signal});
  } catch (error) {
    replace(list, errorNotice(error) ?? '');
    return;
  }
  const empty = () => h('p', {class: 'empty', text: 'No datasets yet. Upload one from New job.'});
  if (!datasets.length) {
    list.append(empty());
    return;
  }
  const removed = () => {
    if (!list.querySelector('.dataset-card')) list.append(empty());
  };
  const cards = datasets.map((dataset) => {
    const card = datasetCard(dataset, ctx.signal, removed);
    list.append(card);
    return card;
  });
  let next = 0;
  const fill = async () => {
    while (next < cards.length && !ctx.signal.aborted) {
      const card = cards[next];
      next += 1;
      await card.fill(urls, ctx.signal);
    }
  };
  await Promise.all(Array.from({length: PARALLEL}, fill));
}

function datasetCard(dataset, signal, removed) {
  const thumbs = h('div', {class: 'thumbs'});
  const captions = h('ul', {class: 'captions'});
  const report = h('div');
  const problem = h('p', {class: 'notice error card-problem', role: 'alert', hidden: true});
  const remove = h('button', {type: 'button', class: 'small danger', text: 'Delete', 'aria-label': `Delete ${dataset.name}`});
  const uncaptioned = dataset.image_count - dataset.captioned_count;
  const card = h('article', {class: 'card dataset-card', dataset: {datasetId: dataset.id}},
    h('div', {class: 'dataset-head'},
      h('h2', {text: dataset.name}),
      h('span', {class: 'muted small', title: fmt.dateTime(dataset.created_at), text: fmt.age(dataset.created_at)})),
    h('p', {class: 'counts'},
      h('span', {class: 'count', text: `${dataset.image_count} images`}),
      h('span', {class: `count${uncaptioned ? ' warn' : ''}`, text: `${dataset.captioned_count} captioned`}),
      uncaptioned ? h('span', {class: 'count warn', text: `${uncaptioned} without caption`}) : null,
      h('span', {class: 'count', text: fmt.bytes(dataset.total_bytes)})),
    thumbs, captions, report, problem,
    h('div', {class: 'dataset-foot'}, h('span', {class: 'muted small mono', text: `id ${dataset.id}`}),
      h('div', {class: 'actions'}, remove,
        h('a', {class: 'button small', href: `/jobs/new?dataset=${encodeURIComponent(dataset.id)}`, text: 'Train on it'}))));

  remove.addEventListener('click', async () => {
    remove.disabled = true;
    problem.hidden = true;
    const sure = await confirmDialog({signal, title: `Delete ${dataset.name}?`,
      message: `Its ${dataset.image_count} images and their captions are deleted from the server. This cannot be undone.`});
    try {
      if (!sure) return;
      await request('DELETE', `/v1/datasets/${encodeURIComponent(dataset.id)}`);
      toast(`Deleted ${dataset.name}`);
      card.remove();
      removed();
    } catch (error) {
      if (error.status === 404) { // gone already
        card.remove();
        removed();
      } else if (!isAbort(error)) {
        // 409: the server says how many jobs still use it
        replace(problem, error.message, error.status === 409 ? [h('br'), h('a', {href: `/jobs?dataset=${encodeURIComponent(dataset.id)}`, text: 'See those jobs'})] : null);
        problem.hidden = false;
      }
    } finally {
      remove.disabled = false;
    }
  });

  card.fill = async (urls, signal) => {
    try {
      const detail = await get(`/v1/datasets/${encodeURIComponent(dataset.id)}`, {signal});
      for (const [n, path] of detail.thumbnails.entries()) {
        const img = h('img', {alt: `${dataset.name}: image ${n + 1}`, width: 96, height: 96});
        thumbs.append(img);
        imageUrl(path, urls, {signal}).then((url) => { img.src = url; }).catch(() => img.remove());
      }
      replace(captions, ...detail.captions.map((item) => h('li', {},
        h('span', {class: 'mono small', text: item.file}), h('span', {class: 'caption', text: item.caption || '(no caption)'}))));
      replace(report, reportSummary(detail.report, {compact: true}));
    } catch (error) {
      if (!isAbort(error)) replace(report, errorNotice(error));
    }
  };
  return card;
}
