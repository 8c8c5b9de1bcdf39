// Parts of the job page: the validation image gallery, the downloads, the configuration.

import {artifactPath, download, imageUrl, isAbort} from '../api.js';
import {h, replace, toast} from '../dom.js';
import * as fmt from '../format.js';
import {errorNotice} from './common.js';

/** Validation images grouped by step, newest step first; each image is fetched with the key. */
export function sampleGallery(container, jobId, urls, signal) {
  const groups = new Map(); // step -> {grid, names}
  const empty = h('p', {class: 'muted', text: 'No validation images yet. They appear here as the trainer renders them.'});
  container.append(empty);

  function group(step) {
    if (groups.has(step)) return groups.get(step);
    const grid = h('div', {class: 'gallery-grid'});
    const section = h('div', {class: 'gallery-group', dataset: {step: String(step)}},
      h('h3', {text: `Step ${step}`}), grid);
    const later = [...groups.keys()].filter((other) => other < step).sort((a, b) => b - a)[0];
    container.insertBefore(section, later === undefined ? null : groups.get(later).section);
    const entry = {section, grid, names: new Set()};
    groups.set(step, entry);
    return entry;
  }

  return {
    /** A job without a validation prompt renders none: say so instead of "not yet". */
    expectNone() {
      empty.textContent = 'This job renders no validation images (it has no validation_prompt).';
    },
    add(step, names) {
      const entry = group(step ?? 0);
      empty.hidden = true;
      for (const name of names) {
        if (entry.names.has(name)) continue;
        entry.names.add(name);
        const img = h('img', {alt: `validation image, step ${step}: ${name}`, loading: 'lazy', width: 256, height: 256});
        const link = h('a', {class: 'sample', target: '_blank', rel: 'noopener', title: name}, img);
        // The final images come from the saved LoRA file loaded into a fresh pipeline.
        entry.grid.append(h('figure', {class: 'sample-figure'}, link,
          h('figcaption', {class: 'muted small', text: /(^|\/)final-/.test(name) ? 'final, from the saved file' : `step ${step}`})));
        imageUrl(artifactPath(jobId, name), urls, {signal}).then((url) => {
          img.src = url;
          link.href = url;
        }).catch((error) => {
          if (!isAbort(error)) replace(link, h('span', {class: 'muted small', text: `${name}: ${error.message}`}));
        });
      }
    },
  };
}

const SECTIONS = [['lora', 'Final LoRA'], ['checkpoint', 'Checkpoints'], ['tensorboard', 'TensorBoard'], ['log', 'Training logs']];

/** The job's files (samples aside: they are in the gallery), with sizes, saved with the key. */
export function downloadsList(container, jobId) {
  container.append(h('p', {class: 'muted', text: 'Loading…'}));
  return {
    show(artifacts) {
      const files = artifacts.filter((a) => a.kind !== 'sample');
      if (!files.length) {
        replace(container, h('p', {class: 'muted', text: 'Nothing to download yet: checkpoints and the LoRA appear here.'}));
        return;
      }
      const known = new Set(SECTIONS.map(([kind]) => kind));
      const sections = [...SECTIONS, ['other', 'Other files']].map(([kind, title]) => {
        const items = files.filter((a) => (kind === 'other' ? !known.has(a.kind) : a.kind === kind))
          .sort((a, b) => (a.step ?? 0) - (b.step ?? 0) || a.name.localeCompare(b.name));
        return items.length ? [h('h3', {text: title}), h('ul', {class: 'files'}, items.map((a) => fileItem(jobId, a)))] : null;
      });
      if (files.some((a) => a.kind === 'tensorboard')) sections.push([folderZip(jobId, 'tensorboard')]);
      const lora = files.find((a) => a.kind === 'lora' && a.metadata);
      if (lora) sections.push([h('h3', {text: 'LoRA metadata'}), metadataTable(lora.metadata)]);
      replace(container, ...sections.flat().filter(Boolean));
    },
    fail(error) {
      replace(container, errorNotice(error));
    },
  };
}

function fileItem(jobId, artifact, tag = 'li') {
  const button = h('button', {type: 'button', class: 'small', text: 'Download', dataset: {artifact: artifact.name}});
  button.addEventListener('click', async () => {
    button.disabled = true;
    button.textContent = 'Downloading…';
    try {
      await download(artifactPath(jobId, artifact.name), artifact.name.replaceAll('/', '-'));
    } catch (error) {
      if (!isAbort(error)) toast(`Download failed: ${error.message}`, 'error');
    } finally {
      button.disabled = false;
      button.textContent = 'Download';
    }
  });
  const about = artifact.sha256 === null ? 'all of the folder, as a zip' :
    `${fmt.bytes(artifact.size)}${artifact.step !== null ? ` · step ${artifact.step}` : ''} · sha256 ${artifact.sha256.slice(0, 12)}…`;
  return h(tag, {class: tag === 'li' ? '' : 'files folder-zip'},
    h('div', {class: 'file-name'}, h('span', {class: 'mono', text: artifact.name}),
      h('span', {class: 'muted small', title: artifact.sha256 ? `sha256 ${artifact.sha256}` : ''}, about)),
    button);
}

/** A button saving every artifact under `folder/` as one zip (GET .../artifacts/<folder>.zip). */
function folderZip(jobId, folder) {
  return fileItem(jobId, {name: `${folder}.zip`, size: null, step: null, sha256: null}, 'div');
}

/** A LoRA file's training metadata (kohya's ss_* and modelspec.* keys), as the file carries it. */
export function metadataTable(metadata) {
  const rows = Object.keys(metadata).sort().map((key) => h('tr', {},
    h('th', {scope: 'row', class: 'mono', text: key}), h('td', {class: 'mono', text: metadata[key]})));
  return h('details', {class: 'lora-metadata'}, h('summary', {text: `${rows.length} keys (ss_*, modelspec.*)`}),
    h('table', {class: 'config-table'}, h('tbody', {}, rows)));
}

/** The validated options the job ran with, as a two-column table. */
export function configTable(config) {
  const rows = Object.entries(config || {}).map(([key, value]) => h('tr', {},
    h('th', {scope: 'row', class: 'mono', text: key}),
    h('td', {class: 'mono', text: value === null ? 'null' : typeof value === 'object' ? JSON.stringify(value) : String(value)})));
  return h('table', {class: 'config-table'}, h('tbody', {}, rows));
}
