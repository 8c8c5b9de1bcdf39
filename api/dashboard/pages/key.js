// The API key form: checked with GET /v1/whoami, then kept in localStorage ('loraq.apiKey').

import {ApiError, get, keyStore} from '../api.js';
import {h} from '../dom.js';

export function keyPage(main, ctx) {
  const next = safeNext(ctx.query.get('next'));
  const input = h('input', {id: 'api-key', name: 'key', type: 'password', autocomplete: 'off', spellcheck: 'false',
    required: true, placeholder: 'paste your key', 'aria-describedby': 'api-key-error'});
  const error = h('p', {class: 'field-error', id: 'api-key-error', role: 'alert'});
  const submit = h('button', {type: 'submit', class: 'primary', text: 'Use this key'});
  const form = h('form', {class: 'card narrow', novalidate: true, onsubmit: save},
    h('label', {for: 'api-key', text: 'API key'}), input, error,
    h('p', {class: 'hint'}, 'Every request from this browser sends it as ', h('code', {text: 'Authorization: Bearer …'}),
      '. A local service writes its first admin key to ', h('code', {text: 'var/admin-key'}), '.'),
    h('div', {class: 'actions'}, submit));

  main.append(h('div', {class: 'page-head'}, h('h1', {text: 'API key'})));
  if (ctx.flash) main.append(h('p', {class: 'notice error', role: 'alert', text: ctx.flash}));
  main.append(form);
  if (keyStore.get()) main.append(savedKeyCard(ctx));
  input.focus();

  async function save(event) {
    event.preventDefault();
    const key = input.value.trim();
    error.textContent = '';
    input.removeAttribute('aria-invalid');
    if (!key) return fail('Enter a key.');
    submit.disabled = true;
    try {
      const who = await get('/v1/whoami', {key, quiet401: true, signal: ctx.signal});
      keyStore.set(key, who);
    } catch (problem) {
      submit.disabled = false;
      if (problem instanceof ApiError && problem.status === 401) {
        return fail(`The server refused this key: ${problem.message}`);
      } else {
        return fail(problem.message || 'The server could not be reached.');
      }
    }
    ctx.refreshWho();
    ctx.navigate(next);
    return undefined;
  }

  function fail(message) {
    error.textContent = message;
    input.setAttribute('aria-invalid', 'true');
    input.focus();
  }
}

function savedKeyCard(ctx) {
  const who = keyStore.who();
  const text = who?.owner
    ? `This browser keeps a key for ${who.owner}${who.admin ? ' (admin)' : ''}, key id ${who.key_id}.`
    : 'This browser keeps a key.';
  return h('div', {class: 'card narrow'},
    h('p', {text: `${text} Enter another above to change it.`}),
    h('div', {class: 'actions'}, h('button', {type: 'button', class: 'danger', text: 'Forget key', onclick: () => {
      keyStore.forget();
      ctx.refreshWho();
      ctx.navigate('/key', {replace: true});
    }})));
}

/** Only a path of this site (no //host, no scheme) may be where the form goes next. */
function safeNext(value) {
  return value && value.startsWith('/') && !value.startsWith('//') && !value.startsWith('/key') ? value : '/';
}
