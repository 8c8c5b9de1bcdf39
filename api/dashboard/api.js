// The API under /v1 with the key this browser keeps: JSON requests, uploads with progress,
// authenticated downloads and images. A 401 anywhere hands over to the key form.

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

/** `handler(message)` runs on every 401 (the key is missing, wrong or revoked). */
export function onUnauthorized(handler) {
  unauthorized = handler;
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
  if (response.ok) return response;
  const error = await errorOf(response);
  if (error.status === 401 && !quiet401) unauthorized(error.message);
  throw error;
}

/** A JSON request; resolves to the parsed body (null for 204). */
export async function request(method, path, {json, headers = {}, signal, key, quiet401} = {}) {
  const init = {method, signal, headers: {...authHeaders(key ?? keyStore.get()), ...headers}};
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await check(await fetch(path, init), {quiet401});
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
      if (xhr.status === 401) unauthorized(error.message);
      reject(error);
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'the upload could not reach the server')));
    xhr.addEventListener('abort', () => reject(new DOMException('upload aborted', 'AbortError')));
    xhr.send(form);
  });
}

export async function fetchBlob(path, {signal} = {}) {
  const response = await check(await fetch(path, {headers: authHeaders(), signal}));
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
