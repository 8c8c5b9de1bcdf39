// A job's Server-Sent Events over fetch(): EventSource cannot send the Authorization header.
// The stream is parsed as the SSE spec says (fields per line, an empty line ends an event), and
// a dropped connection is reopened with Last-Event-ID, so nothing is missed or seen twice.

import {authHeaders, check, isAbort} from './api.js';

const FINAL = new Set(['succeeded', 'failed', 'canceled']);
const RETRY_MS = [500, 1000, 2000, 5000, 10000];

/** Parses SSE text fed in chunks; calls onEvent({id, type, data}) per complete event. */
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.id = null;
    this.type = '';
    this.data = [];
  }

  feed(text) {
    this.buffer += text;
    // A chunk may end between the \r and \n of one line end: keep that \r until the next chunk.
    const held = this.buffer.endsWith('\r') ? 1 : 0;
    const lines = this.buffer.slice(0, this.buffer.length - held).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + (held ? '\r' : ''); // an incomplete last line waits for the next chunk
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) return undefined; // a comment: keep-alive
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'id') this.id = value;
    else if (field === 'event') this.type = value;
    else if (field === 'data') this.data.push(value);
    return undefined;
  }

  dispatch() {
    if (this.data.length) {
      let data = this.data.join('\n');
      try {
        data = JSON.parse(data);
      } catch {
        // not JSON: hand over the text
      }
      this.onEvent({id: this.id === null ? null : Number(this.id), type: this.type || 'message', data});
    }
    this.reset();
  }
}

/**
 * Follow /v1/jobs/{id}/events from event `after` on. Calls onEvent(event) for each, in order;
 * onStatus('live' | 'reconnecting' | 'ended'); onError(error) for an answer that will not change
 * with a retry (404, 401). Ends by itself after the job reached a final state and the server
 * closed the stream. Returns {close(), last()}.
 */
export function followJobEvents(jobId, {after = 0, onEvent, onStatus = () => {}, onError = () => {}}) {
  const controller = new AbortController();
  let last = after;
  let finalSeen = false;
  let failures = 0;

  const handle = (event) => {
    if (event.id !== null && event.id <= last) return; // never twice
    if (event.id !== null) last = event.id;
    if (event.type === 'state') finalSeen = FINAL.has(event.data?.state);
    onEvent(event);
  };

  async function readOnce() {
    const headers = {...authHeaders(), Accept: 'text/event-stream'};
    if (last > 0) headers['Last-Event-ID'] = String(last);
    const response = await check(await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`,
      {headers, signal: controller.signal, cache: 'no-store'}));
    onStatus('live');
    failures = 0;
    const parser = new SseParser(handle);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      parser.feed(value);
    }
  }

  (async () => {
    while (!controller.signal.aborted) {
      try {
        await readOnce();
        if (finalSeen) break; // the server ends the stream once the job is final
      } catch (error) {
        if (isAbort(error) || controller.signal.aborted) return;
        if (error.status && error.status < 500 && error.status !== 429) {
          onError(error);
          return;
        }
      }
      onStatus('reconnecting');
      const wait = RETRY_MS[Math.min(failures, RETRY_MS.length - 1)];
      failures += 1;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
    if (!controller.signal.aborted) onStatus('ended');
  })();

  return {close: () => controller.abort(), last: () => last};
}
