// Small DOM helpers. Text always goes in as text (never as HTML), so names, captions and server
// messages cannot inject markup.

/** h('a', {class: 'x', href: '/', onclick: fn}, 'text', child, [more]) -> element */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== 'string') node[key] = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** node's children replaced by `children` (nested arrays flattened; null, undefined and false skipped). */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

/** A progress bar: a track with a fill, role=progressbar, value/max as ARIA values. */
export function progressBar() {
  const fill = h('div', {class: 'progress-fill'});
  const label = h('span', {class: 'progress-label'});
  const bar = h('div', {class: 'progress', role: 'progressbar', 'aria-valuemin': '0'}, fill, label);
  bar.set = (value, max, text, state) => {
    if (state) bar.dataset.state = state;
    const fraction = max > 0 ? Math.min(Math.max(value / max, 0), 1) : 0;
    fill.style.width = `${(fraction * 100).toFixed(1)}%`;
    bar.setAttribute('aria-valuenow', String(value));
    bar.setAttribute('aria-valuemax', String(max));
    label.textContent = text ?? `${value} / ${max}`;
  };
  return bar;
}

export function stateBadge(state) {
  return h('span', {class: `badge state-${state}`, text: state});
}

/** A short message in the corner; kind: 'info' | 'error'. */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  if (!box) return;
  const item = h('div', {class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status', text: message});
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

/**
 * Ask before something that cannot be undone, in a modal <dialog> (Esc, Cancel or a click
 * outside say no; the safe answer has the focus). Resolves to true for the `action` button.
 * `signal` (the page's) closes it unanswered when the user leaves the page meanwhile.
 */
export function confirmDialog({title, message, action = 'Delete', signal} = {}) {
  const cancel = h('button', {type: 'submit', value: 'cancel', text: 'Cancel', autofocus: true});
  const confirm = h('button', {type: 'submit', value: 'confirm', class: 'danger solid', text: action});
  const dialog = h('dialog', {class: 'confirm', 'aria-labelledby': 'confirm-title', 'aria-describedby': 'confirm-message'},
    h('form', {method: 'dialog'},
      h('h2', {id: 'confirm-title', text: title}),
      h('p', {id: 'confirm-message', text: message}),
      h('div', {class: 'actions'}, cancel, confirm)));
  // A click on the backdrop lands on the dialog itself (the form fills its box).
  dialog.addEventListener('click', (event) => { if (event.target === dialog) dialog.close('cancel'); });
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const stop = () => dialog.close('cancel');
    signal?.addEventListener('abort', stop, {once: true});
    dialog.addEventListener('close', () => {
      signal?.removeEventListener('abort', stop);
      dialog.remove();
      resolve(dialog.returnValue === 'confirm');
    }, {once: true});
    document.body.append(dialog);
    dialog.showModal();
  });
}
