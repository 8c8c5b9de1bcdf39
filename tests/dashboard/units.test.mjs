// The dashboard's pure helpers under Node's test runner (run from test_pages.py): the SSE
// parser that replaces EventSource, and the split of a server message by the fields it names.

import assert from 'node:assert/strict';
import test from 'node:test';
import {splitMessage} from '../../api/dashboard/options-form.js';
import {SseParser} from '../../api/dashboard/sse.js';

function parse(chunks) {
  const events = [];
  const parser = new SseParser((event) => events.push(event));
  for (const chunk of chunks) parser.feed(chunk);
  return events;
}

test('events split anywhere across chunks come out whole, in order', () => {
  const text = 'id: 1\nevent: step\ndata: {"step":1}\n\n: keep-alive\n\nid: 2\r\nevent: state\r\ndata: {"state":"running"}\r\n\r\n';
  const whole = parse([text]);
  assert.deepEqual(whole, [{id: 1, type: 'step', data: {step: 1}}, {id: 2, type: 'state', data: {state: 'running'}}]);
  for (let cut = 1; cut < text.length; cut += 1) {
    assert.deepEqual(parse([text.slice(0, cut), text.slice(cut)]), whole, `cut at ${cut}`);
  }
});

test('multi-line data is joined; an event without data or not yet ended is not dispatched', () => {
  assert.deepEqual(parse(['data: a\ndata: b\n\nevent: x\n\ndata: {"half":']),
    [{id: null, type: 'message', data: 'a\nb'}]);
});

test('a server message goes to the fields it names; the rest stays general', () => {
  const known = new Set(['resolution', 'learning_rate', 'base_model']);
  const {fields, rest} = splitMessage(
    "resolution: must be a positive multiple of 8 (got 30); options.learning_rate: Input should be greater than 0; " +
    "base_model: unknown base model 'x'; GET /v1/models lists them; Idempotency-Key 'k' was already used",
    (name) => known.has(name));
  assert.equal(fields.get('resolution'), 'must be a positive multiple of 8 (got 30)');
  assert.equal(fields.get('learning_rate'), 'Input should be greater than 0');
  assert.equal(fields.get('base_model'), "unknown base model 'x'; GET /v1/models lists them; Idempotency-Key 'k' was already used");
  assert.deepEqual(rest, []);
  assert.deepEqual(splitMessage('dataset abc not found', () => false), {fields: new Map(), rest: ['dataset abc not found']});
  assert.deepEqual(splitMessage('learning_rat: unknown option', (name) => known.has(name)).rest, ['learning_rat: unknown option']);
});
