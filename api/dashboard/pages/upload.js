// Uploading a dataset: drop or choose a zip, images with captions, or a whole folder; the bytes
// go up with a progress bar and the server's pre-flight report comes back.

import {isAbort, uploadDataset} from '../api.js';
import {h, progressBar, replace} from '../dom.js';
import * as fmt from '../format.js';
import {reportSummary} from './report.js';

const ACCEPT = '.zip,.png,.jpg,.jpeg,.webp,.txt,.jsonl,image/png,image/jpeg,image/webp,application/zip';

/** The upload box; onUploaded(dataset) runs with the server's answer (a DatasetDetail). */
export function uploadBox(onUploaded) {
  const files = h('input', {type: 'file', multiple: true, accept: ACCEPT, id: 'upload-files', class: 'visually-hidden'});
  const folder = h('input', {type: 'file', multiple: true, webkitdirectory: true, id: 'upload-folder', class: 'visually-hidden'});
  const name = h('input', {type: 'text', id: 'upload-name', maxlength: '200', autocomplete: 'off', placeholder: 'from the zip or folder'});
  const bar = progressBar();
  const status = h('p', {class: 'upload-status', 'aria-live': 'polite'});
  const result = h('div', {class: 'upload-result'});
  const progress = h('div', {class: 'upload-progress', hidden: true}, bar, status);
  const zone = h('div', {class: 'dropzone', id: 'dropzone', tabindex: '0', role: 'group', 'aria-label': 'Drop dataset files here'},
    h('p', {class: 'dropzone-title', text: 'Drop a zip, images with captions, or a folder here'}),
    h('p', {class: 'muted small', text: 'PNG, JPEG or WebP; captions as .txt files with the same name or a metadata.jsonl'}),
    h('div', {class: 'actions center'},
      h('label', {class: 'button', for: 'upload-files', text: 'Choose files'}), files,
      h('label', {class: 'button', for: 'upload-folder', text: 'Choose folder'}), folder));
  let busy = false;

  async function send(items, defaultName) {
    if (busy || !items.length) return;
    busy = true;
    zone.classList.add('busy');
    result.replaceChildren();
    progress.hidden = false;
    const total = items.reduce((sum, item) => sum + item.file.size, 0);
    bar.set(0, total, '0%');
    status.textContent = `Uploading ${items.length} file(s), ${fmt.bytes(total)}…`;
    try {
      const dataset = await uploadDataset(items, name.value.trim() || defaultName, (loaded, all) => {
        bar.set(loaded, all, `${Math.round((100 * loaded) / all)}%`);
        status.textContent = loaded < all ? `Uploading… ${fmt.bytes(loaded)} of ${fmt.bytes(all)}`
          : 'Uploaded; the server is checking every image…';
      });
      bar.set(1, 1, '100%');
      // 200 with reused: the server already held these exact files for this owner and answered
      // with that dataset; say so, or the user looks for a second copy that was never stored.
      status.textContent = dataset.reused
        ? `You already have these files: dataset “${dataset.name}” (uploaded ${fmt.age(dataset.created_at)}) is reused; nothing new was stored.`
        : `Dataset “${dataset.name}” is ready.`;
      status.dataset.reused = String(Boolean(dataset.reused));
      replace(result, reportSummary(dataset.report));
      name.value = '';
      onUploaded(dataset);
    } catch (error) {
      if (!isAbort(error)) {
        status.textContent = '';
        progress.hidden = true;
        replace(result, h('p', {class: 'notice error', role: 'alert', text: `Upload refused: ${error.message}`}));
      }
    } finally {
      busy = false;
      zone.classList.remove('busy');
      files.value = '';
      folder.value = '';
    }
  }

  files.addEventListener('change', () => send(fromFileList(files.files), guessName(files.files)));
  folder.addEventListener('change', () => send(fromFileList(folder.files), guessName(folder.files)));
  for (const type of ['dragenter', 'dragover']) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add('over'); });
  }
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (event) => {
    event.preventDefault();
    zone.classList.remove('over');
    const {items, name: dropped} = await fromDrop(event.dataTransfer);
    send(items, dropped);
  });

  return h('div', {class: 'upload'}, zone,
    h('div', {class: 'field'}, h('label', {for: 'upload-name', text: 'Name for the new dataset (optional)'}), name),
    progress, result);
}

/** [{file, name}] with paths relative to the chosen folder (so metadata.jsonl keeps its name). */
function fromFileList(list) {
  return relative([...list].map((file) => ({file, name: file.webkitRelativePath || file.name})));
}

function guessName(list) {
  const first = list[0];
  if (!first) return '';
  if (first.webkitRelativePath) return first.webkitRelativePath.split('/')[0];
  return list.length === 1 ? first.name.replace(/\.zip$/i, '') : '';
}

/** Dropped files and folders (walked with the entries API), or plain files where it is missing. */
async function fromDrop(transfer) {
  const entries = [...(transfer.items || [])].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) {
    const files = [...transfer.files];
    return {items: fromFileList(files), name: guessName(files)};
  }
  const items = [];
  for (const entry of entries) await walk(entry, '', items);
  const name = entries.length === 1 ? entries[0].name.replace(/\.zip$/i, '') : '';
  return {items: relative(items), name};
}

async function walk(entry, prefix, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({file, name: prefix + entry.name});
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return;
    for (const child of batch) await walk(child, `${prefix}${entry.name}/`, out);
  }
}

/** Hidden files left out, and a folder prefix all files share removed. */
function relative(items) {
  const visible = items.filter((item) => !item.name.split('/').some((part) => part.startsWith('.')));
  const tops = new Set(visible.map((item) => (item.name.includes('/') ? item.name.split('/')[0] : null)));
  if (tops.size === 1 && !tops.has(null)) {
    for (const item of visible) item.name = item.name.slice(item.name.indexOf('/') + 1);
  }
  return visible;
}
