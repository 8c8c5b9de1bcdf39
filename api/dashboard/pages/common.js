// Pieces the pages share: job actions (delete too), dataset names, error notices.

import {getAll, isAbort, post, request} from '../api.js';
import {confirmDialog, h, toast} from '../dom.js';

export const FINAL_STATES = new Set(['succeeded', 'failed', 'canceled']);
export const STATES = ['queued', 'running', 'canceling', 'succeeded', 'failed', 'canceled'];

export function canCancel(job) {
  return job.state === 'queued' || job.state === 'running';
}

export function canRetry(job) {
  return job.state === 'failed' || job.state === 'canceled';
}

export function canDelete(job) {
  return FINAL_STATES.has(job.state);
}

/** POST cancel or retry; resolves to the job as the server now has it (or null on failure). */
export async function jobAction(job, action) {
  try {
    const updated = await post(`/v1/jobs/${encodeURIComponent(job.id)}/${action}`);
    toast(action === 'cancel' ? `Cancel requested: ${jobTitle(updated)} is ${updated.state}` : `${jobTitle(updated)} queued again`);
    return updated;
  } catch (error) {
    if (!isAbort(error)) toast(`Could not ${action}: ${error.message}`, 'error');
    return null;
  }
}

/**
 * Ask in a dialog, then DELETE the job; resolves to true once it is gone (a 404: gone already).
 * The server refuses (409) while the job is active: its message goes to a toast.
 */
export async function deleteJob(job, signal) {
  const title = jobTitle(job);
  const sure = await confirmDialog({signal, title: `Delete ${title}?`,
    message: `The job is deleted with its LoRA, checkpoints, validation images, logs and metrics. This cannot be undone.`});
  if (!sure) return false;
  try {
    await request('DELETE', `/v1/jobs/${encodeURIComponent(job.id)}`);
    toast(`Deleted ${title}`);
    return true;
  } catch (error) {
    if (error.status === 404) {
      toast(`${title} was already deleted`);
      return true;
    }
    if (!isAbort(error)) toast(`Could not delete ${title}: ${error.message}`, 'error');
    return false;
  }
}

export function jobTitle(job) {
  return job.name || `Job ${job.id.slice(0, 8)}`;
}

/** Map of dataset id -> name, loaded once per page and again when an unknown id turns up. */
export function datasetNames(signal) {
  let names = new Map();
  let loading = null;
  return {
    name: (id) => names.get(id),
    async ensure(ids) {
      if (ids.every((id) => names.has(id)) || loading) return loading;
      loading = getAll('/v1/datasets', {signal})
        .then((items) => { names = new Map(items.map((d) => [d.id, d.name])); })
        .catch(() => {})
        .finally(() => { loading = null; });
      return loading;
    },
  };
}

/** A notice for an error a page could not recover from (aborts, from leaving the page, are silent). */
export function errorNotice(error) {
  if (isAbort(error)) return null;
  return h('p', {class: 'notice error', role: 'alert', text: error.message || String(error)});
}
