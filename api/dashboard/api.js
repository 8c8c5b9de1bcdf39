// The API under /v1 with the key this browser keeps: JSON requests, uploads with progress,
// authenticated downloads and images. A 401 anywhere hands over to the key form. A 503 (the
// database or Redis away for a while) raises the "service unavailable, retrying" notice, and
// reads wait and try again until the service answers, so a page never turns into an error.

const KEY_NAME = 'loraq.apiKey';
const WHO_NAME = 'loraq.whoami';

export const keyStore = {
  get: () => localStorage.getItem(KEY_NAME),
  set(key, who) {
    localStorage.setItem(KEY_NAME, key);
    if (who) sessionStorage.setItem(WHO_NAME, JSON.stringify(who));
    else sessionStorage.removeItem(WHO_NAME);
  },
  forget() {
    localStorage.removeItem(KEY_NAME);
    sessionStorage.removeItem(WHO_NAME);
  },
  who() {
    try {
      return JSON.parse(sessionStorage.getItem(WHO_NAME));
    } catch {
      return null;
    }
  },
};

/** An error answer: its status and the server's message (`{"error": {"status", "message"}}`). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

let unauthorized = () => {};
let outage = {show: () => {}, hide: () => {}};
let unavailable = false; // the last answer was a 503

/** `handler(message)` runs on every 401 (the key is missing, wrong or revoked). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** `show(message)` runs on a 503 (the server's message names the store that is away); `hide()`
 * on the first answer after it that is not a 503. */
export function onUnavailable(show, hide) {
  outage = {show, hide};
}

function noteAvailability(status) {
  if (status === 503) return;
  if (unavailable) outage.hide();
  unavailable = false;
}

const RETRY_MAX_MS = 5000;

/** Wait out a 503: the server's Retry-After (seconds), at most RETRY_MAX_MS; rejects on abort. */
function pause(response, signal) {
  const seconds = Number(response.headers.get('Retry-After'));
  const ms = Math.min(Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 2000, RETRY_MAX_MS);
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new DOMException('aborted', 'AbortError'));
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(new DOMException('aborted', 'AbortError'));
    }, {once: true});
  });
}

/** fetch(), where a read (GET) that gets a 503 waits and tries again until it gets anything else. */
async function fetchRetrying(path, init) {
  for (;;) {
    const response = await fetch(path, init);
    if (response.status !== 503 || (init.method ?? 'GET') !== 'GET') return response;
    const error = await errorOf(response);
    unavailable = true;
    outage.show(error.message);
    await pause(response, init.signal);
  }
}

export function isAbort(error) {
  return error?.name === 'AbortError';
}

export function authHeaders(key = keyStore.get()) {
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    message = body?.error?.message ?? message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

/** Throws an ApiError for a non-2xx answer; a 401 also goes to the key form unless `quiet401`. */
export async function check(response, {quiet401 = false} = {}) {
  noteAvailability(response.status);
  if (response.ok) return response;
  const error = await errorOf(response);
  if (error.status === 401 && !quiet401) unauthorized(error.message);
  if (error.status === 503) {
    unavailable = true;
    outage.show(error.message);
  }
  throw error;
}

/** A JSON request; resolves to the parsed body (null for 204). */
export async function request(method, path, {json, headers = {}, signal, key, quiet401} = {}) {
  const init = {method, signal, headers: {...authHeaders(key ?? keyStore.get()), ...headers}};
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await check(await fetchRetrying(path, init), {quiet401});
  return response.status === 204 ? null : response.json();
}

export const get = (path, options) => request('GET', path, options);
export const post = (path, json, options = {}) => request('POST', path, {...options, json});

/** Every item of a paged collection (`{items, total}`), up to `max`. */
export async function getAll(path, {signal, max = 1000} = {}) {
  const items = [];
  for (;;) {
    const separator = path.includes('?') ? '&' : '?';
    const page = await get(`${path}${separator}limit=200&offset=${items.length}`, {signal});
    items.push(...page.items);
    if (!page.items.length || items.length >= Math.min(page.total, max)) return items;
  }
}

/**
 * POST /v1/datasets with XMLHttpRequest, the one browser API that reports upload progress.
 * files: [{file: File, name: 'a.png'}]; onProgress(loaded, total). Resolves to the dataset.
 */
export function uploadDataset(files, name, onProgress) {
  const form = new FormData();
  for (const item of files) form.append('files', item.file, item.name);
  if (name) form.append('name', name);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1/datasets');
    for (const [header, value] of Object.entries(authHeaders())) xhr.setRequestHeader(header, value);
    xhr.responseType = 'json';
    xhr.upload.addEventListener('progress', (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener('load', () => {
      if (xhr.status === 201 || xhr.status === 200) return resolve(xhr.response); // 200: an identical dataset, reused
      const error = new ApiError(xhr.status, xhr.response?.error?.message ?? `upload failed (${xhr.status})`);
      noteAvailability(xhr.status);
      if (xhr.status === 401) unauthorized(error.message);
      if (xhr.status === 503) {
        unavailable = true;
        outage.show(error.message);
      }
      reject(error);
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'the upload could not reach the server')));
    xhr.addEventListener('abort', () => reject(new DOMException('upload aborted', 'AbortError')));
    xhr.send(form);
  });
}

export async function fetchBlob(path, {signal} = {}) {
  const response = await check(await fetchRetrying(path, {headers: authHeaders(), signal}));
  return response.blob();
}

/** Save a /v1 file: fetched with the key (a plain link cannot send it), then saved from memory. */
export async function download(path, filename) {
  const url = URL.createObjectURL(await fetchBlob(path));
  const link = Object.assign(document.createElement('a'), {href: url, download: filename});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** An object URL of a /v1 image for an <img>; `urls` collects it for revoking on leaving. */
export async function imageUrl(path, urls, {signal} = {}) {
  const url = URL.createObjectURL(await fetchBlob(path, {signal}));
  urls.push(url);
  return url;
}

export function artifactPath(jobId, name) {
  return `/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${name.split('/').map(encodeURIComponent).join('/')}`;
}
