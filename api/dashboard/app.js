// The dashboard's shell: routes a path to its page, keeps links in the page (no reloads), and
// sends the user to the key form when there is no key or the server refuses it.

import {get, keyStore, onUnauthorized, onUnavailable} from './api.js';
import {clear, h} from './dom.js';
import {datasetsPage} from './pages/datasets.js';
import {jobPage} from './pages/job.js';
import {jobsPage} from './pages/jobs.js';
import {keyPage} from './pages/key.js';
import {newJobPage} from './pages/new-job.js';
import {workersPage} from './pages/workers.js';

const ROUTES = [
  {pattern: /^\/(jobs)?$/, page: jobsPage, nav: 'jobs', title: 'Jobs'},
  {pattern: /^\/jobs\/new$/, page: newJobPage, nav: 'new', title: 'New job'},
  {pattern: /^\/jobs\/([^/]+)$/, page: jobPage, nav: 'jobs', title: 'Job'},
  {pattern: /^\/datasets$/, page: datasetsPage, nav: 'datasets', title: 'Datasets'},
  {pattern: /^\/workers$/, page: workersPage, nav: 'workers', title: 'Workers'},
  {pattern: /^\/key$/, page: keyPage, nav: 'key', title: 'API key', public: true},
];

const main = document.getElementById('main');
let leave = null; // the current page's cleanup
let flash = null; // a message for the next page (why we landed on the key form)

export function navigate(url, {replace = false} = {}) {
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  render();
}

function render() {
  if (leave) leave();
  leave = null;
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const route = routeOf(path);
  if (!route) {
    clear(main).append(h('h1', {text: 'Not found'}), h('p', {}, 'No page here. ', h('a', {href: '/', text: 'Jobs'})));
    return;
  }
  if (!route.public && !keyStore.get()) {
    const next = location.pathname + location.search;
    navigate(`/key?next=${encodeURIComponent(next)}`, {replace: true});
    return;
  }
  document.title = `${route.title} · loraq`;
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('active', link.dataset.nav === route.nav);
  }
  updateWho();
  const controller = new AbortController();
  const cleanups = [];
  const ctx = {
    params: path.match(route.pattern).slice(1),
    query: new URLSearchParams(location.search),
    signal: controller.signal,
    navigate,
    flash: takeFlash(),
    onLeave: (fn) => cleanups.push(fn),
    refreshWho: updateWho,
  };
  clear(main);
  window.scrollTo(0, 0);
  route.page(main, ctx);
  leave = () => {
    controller.abort();
    for (const fn of cleanups) fn();
  };
}

function routeOf(pathname) {
  const path = pathname.replace(/\/+$/, '') || '/';
  return ROUTES.find((candidate) => candidate.pattern.test(path));
}

function takeFlash() {
  const message = flash;
  flash = null;
  return message;
}

function updateWho() {
  const who = document.getElementById('who');
  const info = keyStore.who();
  who.textContent = !keyStore.get() ? 'Enter API key' : info?.owner ? `${info.owner}${info.admin ? ' (admin)' : ''}` : 'API key';
  who.title = keyStore.get() ? 'Change or forget the API key' : 'Enter an API key';
}

onUnauthorized((message) => {
  if (location.pathname === '/key') return;
  keyStore.forget();
  flash = `The server refused the API key: ${message}. Enter a valid key.`;
  navigate(`/key?next=${encodeURIComponent(location.pathname + location.search)}`, {replace: true});
});

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[href]');
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  if (link.target || link.hasAttribute('download') || link.origin !== location.origin) return;
  const url = new URL(link.href);
  if (!routeOf(url.pathname)) return; // /docs, /healthz, files: a normal visit
  event.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
});

// The database or Redis away for a while: one notice above every page while reads wait and try
// again (api.js), gone with the first answer after it; the page itself stays as it was.
const outage = h('div', {id: 'outage', class: 'outage', role: 'status', hidden: true},
  h('strong', {text: 'Service unavailable, retrying…'}), ' ', h('span', {class: 'outage-detail'}));
document.querySelector('.topbar').after(outage);
onUnavailable((message) => {
  outage.querySelector('.outage-detail').textContent = message.replace(/^service unavailable:\s*/i, '');
  outage.hidden = false;
}, () => {
  outage.hidden = true;
});

window.addEventListener('popstate', render);
render();

// A key kept from an earlier visit: learn its owner for the top bar (a refused key is handled
// by the first page's own request).
if (keyStore.get() && !keyStore.who()) {
  const key = keyStore.get();
  get('/v1/whoami', {quiet401: true}).then((who) => {
    if (keyStore.get() === key) keyStore.set(key, who);
    updateWho();
  }).catch(() => {});
}
