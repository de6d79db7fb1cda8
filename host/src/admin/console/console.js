// ksm console: a small single page app over the ksm admin API.
// Everything from the API is shown with textContent, never as HTML.
'use strict';

const TOKEN_KEY = 'ksm-token';
const POLL_MS = 2000;
const SAMPLES = 60;
const LETTER_PAGE = 100;
const HEX_LIMIT = 64 * 1024;

// ---- DOM helpers ----

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'value' || k === 'checked') e[k] = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat()) {
    if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of kids) e.append(c);
  return e;
}

const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;
const fmtNum = (n) => (typeof n === 'number' ? n.toLocaleString() : '–');

function fmtBytes(n) {
  if (typeof n !== 'number') return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return String(i === 0 ? n : Number(n.toFixed(n < 10 ? 1 : 0))) + ' ' + units[i];
}

function fmtRate(r) {
  return String(Number(r >= 100 ? r.toFixed(0) : r.toFixed(1)));
}

// A <time> in the viewer's zone, with UTC as its title.
function timeEl(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return h('span', {}, iso || '–');
  return h('time', { datetime: iso, title: d.toISOString() }, d.toLocaleString());
}

function tableWrap(table, label) {
  return h('div', { class: 'table-wrap', role: 'region', 'aria-label': label, tabindex: '0' }, table);
}

function headRow(cols) {
  return h('thead', {}, h('tr', {}, cols.map((c) => h('th', { scope: 'col' }, c))));
}

function alertBox(id) {
  return h('div', { class: 'alert', role: 'alert', id, hidden: true });
}

// Shows an error (or a list of lines) in an alert box; none hides it.
function showAlert(box, msg) {
  box.replaceChildren();
  if (msg == null || (Array.isArray(msg) && !msg.length)) { box.hidden = true; return; }
  if (Array.isArray(msg)) box.append(h('ul', {}, msg.map((m) => h('li', {}, m))));
  else box.append(h('p', {}, msg instanceof Error ? msg.message : String(msg)));
  box.hidden = false;
}

// The notice area: kept for one navigation when set by flash().
let pendingNotice = null;
function notice(msg) {
  const n = $('#notice');
  n.textContent = '';
  // Set after a tick so screen readers announce a repeat of the same text.
  setTimeout(() => { n.textContent = msg || ''; }, 50);
}
function flash(msg, hash) {
  pendingNotice = msg;
  if (location.hash === hash) route();
  else location.hash = hash;
}

// ---- API ----

class AuthLost extends Error {}

let needLogin = false;

async function api(method, path, body, probe) {
  const headers = { Accept: 'application/json, text/plain' };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error('The ksm host did not answer (' + e.message + ').');
  }
  const text = await res.text();
  let data = null;
  if ((res.headers.get('content-type') || '').includes('json') && text) {
    try { data = JSON.parse(text); } catch (e) { /* shown as text */ }
  }
  if (res.status === 401 && !probe) {
    showLogin(token ? 'That token was refused.' : '');
    throw new AuthLost();
  }
  return { status: res.status, ok: res.ok, data, text };
}

function httpError(r) {
  return new Error('Error ' + r.status + (r.text ? ': ' + r.text.trim() : ''));
}

async function getJson(path) {
  const r = await api('GET', path);
  if (!r.ok) throw httpError(r);
  return r.data;
}

// ---- pages, timers, routing ----

let page = null;

function newPage() {
  const p = { alive: true, timers: new Set() };
  p.later = (fn, ms) => {
    const t = setTimeout(() => { p.timers.delete(t); if (p.alive) fn(); }, ms);
    p.timers.add(t);
    return t;
  };
  // Runs fn now and every ms after it ends; returns a stop function.
  p.poll = (fn, ms) => {
    let on = true, t = null;
    const tick = async () => {
      try { await fn(); } catch (e) { /* fn shows its own errors */ }
      if (on && p.alive) t = p.later(tick, ms);
    };
    tick();
    return () => { on = false; clearTimeout(t); p.timers.delete(t); };
  };
  return p;
}

function leavePage() {
  if (!page) return;
  page.alive = false;
  for (const t of page.timers) clearTimeout(t);
  page = null;
}

// Clears <main>, names the page, and returns <main>.
function mount(title, navKey) {
  document.title = title + ' · ksm console';
  const main = $('#main');
  main.replaceChildren(h('h1', { tabindex: '-1' }, title));
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === navKey) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  return main;
}

function focusHeading() {
  const h1 = $('#main h1');
  if (h1) h1.focus({ preventScroll: true });
}

// Links between the pages of one module.
function moduleNav(id, current) {
  const q = enc(id);
  const links = [['edit', 'Edit'], ['logs', 'Logs'], ['dead-letters', 'Dead letters'], ['component', 'Component']];
  return h('nav', { class: 'subnav', 'aria-label': 'Module ' + id },
    h('ul', {}, links.map(([k, label]) => h('li', {},
      h('a', { href: `#/modules/${q}/${k}`, 'aria-current': k === current ? 'page' : null }, label)))));
}

const routes = [
  [/^\/$/, (p) => pageModules(p)],
  [/^\/new$/, (p) => pageForm(p, null)],
  [/^\/modules\/([^/]+)\/edit$/, pageForm],
  [/^\/modules\/([^/]+)\/logs$/, pageLogs],
  [/^\/modules\/([^/]+)\/dead-letters$/, pageDeadLetters],
  [/^\/modules\/([^/]+)\/component$/, pageComponent],
  [/^\/health$/, (p) => pageHealth(p)],
];

function route() {
  leavePage();
  updateHeader();
  if (needLogin) { renderLogin(''); return; }
  const n = $('#notice');
  if (pendingNotice) { notice(pendingNotice); pendingNotice = null; } else n.textContent = '';
  const path = location.hash.replace(/^#/, '') || '/';
  page = newPage();
  for (const [re, fn] of routes) {
    const m = path.match(re);
    if (!m) continue;
    let args;
    try { args = m.slice(1).map(decodeURIComponent); } catch (e) { break; }
    fn(page, ...args);
    focusHeading();
    return;
  }
  const main = mount('Page not found');
  main.append(h('p', {}, 'There is no such page. ', h('a', { href: '#/' }, 'Go to the modules.')));
  focusHeading();
}

function updateHeader() {
  $('#nav').hidden = needLogin;
  $('#sign-out').hidden = needLogin || !sessionStorage.getItem(TOKEN_KEY);
}

// ---- login ----

function showLogin(msg) {
  sessionStorage.removeItem(TOKEN_KEY);
  needLogin = true;
  leavePage();
  updateHeader();
  renderLogin(msg);
}

function renderLogin(msg) {
  const main = mount('Sign in');
  const err = alertBox('login-error');
  const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'current-password', required: true });
  const button = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { id: 'login-form', class: 'stack narrow' },
    h('div', { class: 'field' }, h('label', { for: 'token' }, 'Admin token'), input),
    h('div', {}, button));
  main.append(h('p', {}, 'This ksm host asks for its admin token.'), err, form);
  if (msg) showAlert(err, msg);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) { showAlert(err, 'Enter the admin token.'); input.focus(); return; }
    button.disabled = true;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      const r = await api('GET', '/api/modules', undefined, true);
      if (r.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        showAlert(err, 'That token was refused.');
        input.select();
        input.focus();
        return;
      }
      needLogin = false;
      route();
    } catch (e) {
      showAlert(err, e);
    } finally {
      button.disabled = false;
    }
  });
  input.focus();
}

// Probes the API: open, or a stored token that works, skips the login.
async function start() {
  try {
    const r = await api('GET', '/api/modules', undefined, true);
    if (r.status === 401) {
      showLogin(sessionStorage.getItem(TOKEN_KEY) ? 'That token was refused.' : '');
      return;
    }
  } catch (e) { /* the page says what is wrong */ }
  needLogin = false;
  route();
}

// ---- modules list ----

const samples = new Map(); // module id -> [{t, n}] of counters.forwarded

function recordSamples(list) {
  const now = performance.now();
  const seen = new Set();
  for (const m of list) {
    seen.add(m.id);
    const n = m.counters ? m.counters.forwarded : undefined;
    if (typeof n !== 'number') continue;
    let s = samples.get(m.id) || [];
    if (s.length && n < s[s.length - 1].n) s = []; // the module was recreated
    s.push({ t: now, n });
    if (s.length > SAMPLES) s.splice(0, s.length - SAMPLES);
    samples.set(m.id, s);
  }
  for (const id of samples.keys()) if (!seen.has(id)) samples.delete(id);
}

function rates(s) {
  const out = [];
  for (let i = 1; i < s.length; i++) {
    const dt = (s[i].t - s[i - 1].t) / 1000;
    out.push(dt > 0 ? Math.max(0, (s[i].n - s[i - 1].n) / dt) : 0);
  }
  return out;
}

function sparkline(s) {
  const W = 120, H = 24;
  const r = rates(s || []);
  const label = r.length ? fmtRate(r[r.length - 1]) + ' records/s' : 'rate not known yet';
  const el = svg('svg', { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, class: 'spark' },
    svg('title', {}, label));
  if (r.length) {
    const pts = r.length === 1 ? [r[0], r[0]] : r;
    const max = Math.max(1, ...pts);
    const step = W / (SAMPLES - 2);
    const xy = pts.map((v, i) => {
      const x = W - (pts.length - 1 - i) * step;
      const y = H - 2 - (v / max) * (H - 4);
      return x.toFixed(1) + ',' + y.toFixed(1);
    });
    el.append(svg('polyline', { points: xy.join(' '), fill: 'none', stroke: 'currentColor', 'stroke-width': 1.5 }));
  }
  return h('span', { class: 'rate' }, el, h('span', { 'aria-hidden': 'true' }, r.length ? fmtRate(r[r.length - 1]) + '/s' : ''));
}

const COUNT_FIELDS = ['forwarded', 'dead_lettered', 'retried'];

function moduleRow(id) {
  const q = enc(id);
  const link = (k, label) => h('a', { href: `#/modules/${q}/${k}`, 'aria-label': label + ' ' + id }, label);
  return h('tr', { 'data-module': id },
    h('th', { scope: 'row' }, h('a', { href: `#/modules/${q}/logs` }, id)),
    h('td', { 'data-field': 'description' }),
    h('td', { 'data-field': 'stream' }),
    h('td', { 'data-field': 'status' }),
    COUNT_FIELDS.map((f) => h('td', { 'data-field': f, class: 'num' })),
    h('td', { 'data-field': 'rate' }),
    h('td', { class: 'row-actions' },
      link('edit', 'Edit'), link('logs', 'Logs'), link('dead-letters', 'Dead letters'), link('component', 'Component')));
}

function fillRow(tr, m) {
  const cell = (f) => tr.querySelector(`[data-field="${f}"]`);
  cell('description').textContent = m.description || '';
  cell('stream').textContent = (m.stream_name || '') + (m.region ? ' (' + m.region + ')' : '');
  const st = cell('status');
  st.textContent = m.status || '';
  st.className = 'status status-' + String(m.status || '').replace(/[^a-z]/g, '');
  for (const f of COUNT_FIELDS) cell(f).textContent = fmtNum(m.counters ? m.counters[f] : undefined);
  cell('rate').replaceChildren(sparkline(samples.get(m.id)));
}

function pageModules(p) {
  const main = mount('Modules', 'modules');
  const err = alertBox('modules-error');
  const tbody = h('tbody');
  const table = h('table', { id: 'modules-table' },
    headRow(['ID', 'Description', 'Stream', 'Status', 'Forwarded', 'Dead-lettered', 'Retried', 'Rate', 'Actions']), tbody);
  main.append(h('p', { class: 'toolbar' }, h('a', { href: '#/new', class: 'button', id: 'new-module' }, '+ New')),
    err, tableWrap(table, 'Modules'));
  const rows = new Map();
  p.poll(async () => {
    let list;
    try { list = await getJson('/api/modules'); } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
      return;
    }
    if (!p.alive) return;
    showAlert(err, null);
    recordSamples(list);
    const ids = list.map((m) => m.id);
    for (const [id, tr] of rows) if (!ids.includes(id)) { tr.remove(); rows.delete(id); }
    for (const m of list) {
      if (!rows.has(m.id)) rows.set(m.id, moduleRow(m.id));
      fillRow(rows.get(m.id), m);
    }
    // Rows are moved only when the order changed, so focus stays put.
    const now = [...tbody.querySelectorAll('tr[data-module]')].map((tr) => tr.dataset.module);
    if (now.join('\n') !== ids.join('\n')) tbody.replaceChildren(...ids.map((id) => rows.get(id)));
    if (!list.length) {
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: 9 }, 'No modules yet. ', h('a', { href: '#/new' }, 'Create one.'))));
    }
  }, POLL_MS);
}

// ---- module form ----

const FIELDS = [
  { name: 'id', label: 'Module ID' },
  { name: 'description', label: 'Description' },
  { name: 'subscribe_events', label: 'Subscribe Events', hint: 'Event types, comma-separated: * for every event, or e.g. status, alert.' },
  { name: 'bulk_data_label', label: 'Bulk Data Label', hint: 'Optional. Bulk data with this label is forwarded.' },
  { name: 'role_arn', label: 'Role ARN', hint: 'Optional. A role to assume for Kinesis.' },
  { name: 'external_id', label: 'External ID', hint: 'Optional, only with a role ARN.' },
  { name: 'region', label: 'Region' },
  { name: 'stream_name', label: 'Stream Name' },
  { name: 'use_uuid', label: 'Use UUID', type: 'checkbox', hint: 'A fresh UUID partition key per record, instead of the device or home ID.' },
];
const NULLABLE = ['bulk_data_label', 'role_arn', 'external_id'];

function fieldBlock(f, value, readOnly) {
  const id = 'field-' + f.name;
  const hintId = f.hint ? 'hint-' + f.name : null;
  const input = f.type === 'checkbox'
    ? h('input', { type: 'checkbox', id, name: f.name, checked: !!value, 'aria-describedby': hintId })
    : h('input', { type: 'text', id, name: f.name, value: value == null ? '' : String(value), readonly: readOnly,
      spellcheck: 'false', autocomplete: 'off', 'aria-describedby': hintId });
  const label = h('label', { for: id }, f.label);
  const hint = f.hint ? h('p', { class: 'hint', id: hintId }, f.hint) : null;
  const error = h('p', { class: 'field-error', id: 'error-' + f.name, hidden: true });
  return f.type === 'checkbox'
    ? h('div', { class: 'field check' }, input, label, hint, error)
    : h('div', { class: 'field' }, label, hint, input, error);
}

function setFieldErrors(form, byField) {
  for (const f of FIELDS) {
    const input = form.querySelector('#field-' + f.name);
    const error = form.querySelector('#error-' + f.name);
    const msgs = byField[f.name] || [];
    error.replaceChildren(...msgs.flatMap((m, i) => (i ? [h('br'), m] : [m])));
    error.hidden = !msgs.length;
    const ids = (input.getAttribute('aria-describedby') || '').split(' ').filter((x) => x && x !== error.id);
    if (msgs.length) { ids.push(error.id); input.setAttribute('aria-invalid', 'true'); } else input.removeAttribute('aria-invalid');
    if (ids.length) input.setAttribute('aria-describedby', ids.join(' ')); else input.removeAttribute('aria-describedby');
  }
}

async function pageForm(p, id) {
  const editing = id != null;
  const main = mount(editing ? 'Edit module ' + id : 'New module', 'modules');
  if (editing) main.append(moduleNav(id, 'edit'));
  const err = alertBox('form-errors');
  main.append(err);
  let base = {};
  if (editing) {
    try {
      const m = await getJson('/api/modules/' + enc(id));
      base = m.config || m;
    } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
      return;
    }
    if (!p.alive) return;
  }
  const values = { ...base };
  if (Array.isArray(values.subscribe_events)) values.subscribe_events = values.subscribe_events.join(', ');
  const save = h('button', { type: 'submit' }, 'Save');
  const form = h('form', { id: 'module-form', class: 'stack', novalidate: true },
    FIELDS.map((f) => fieldBlock(f, values[f.name], editing && f.name === 'id')),
    h('div', { class: 'buttons' }, save, h('a', { href: '#/', class: 'button secondary' }, 'Cancel')));
  main.append(form);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = { ...base };
    for (const f of FIELDS) {
      const input = form.querySelector('#field-' + f.name);
      if (f.type === 'checkbox') { body[f.name] = input.checked; continue; }
      const v = input.value.trim();
      if (f.name === 'subscribe_events') body[f.name] = v.split(',').map((s) => s.trim()).filter(Boolean);
      else body[f.name] = NULLABLE.includes(f.name) && !v ? null : v;
    }
    if (editing) body.id = id;
    save.disabled = true;
    try {
      const r = editing
        ? await api('PUT', '/api/modules/' + enc(id), body)
        : await api('POST', '/api/modules', body);
      if (!p.alive) return;
      if (r.status === 200 || r.status === 201) { flash('Module ' + body.id + ' saved', '#/'); return; }
      if (r.status === 422 && r.data && Array.isArray(r.data.problems)) {
        const byField = {}, other = [];
        for (const pr of r.data.problems) {
          const name = String(pr.field || '').replace(/^modules\[\d+\]\./, '');
          const f = FIELDS.find((x) => name === x.name || name.startsWith(x.name + '['));
          if (f) (byField[f.name] = byField[f.name] || []).push(pr.message);
          else other.push((pr.field ? pr.field + ': ' : '') + pr.message);
        }
        setFieldErrors(form, byField);
        showAlert(err, other.length ? other : (Object.keys(byField).length ? null : 'Error 422: ' + r.text));
        const first = form.querySelector('[aria-invalid="true"]');
        if (first) first.focus();
        return;
      }
      setFieldErrors(form, {});
      showAlert(err, r.status === 409 ? r.text.trim() : httpError(r));
    } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
    } finally {
      save.disabled = false;
    }
  });

  if (editing) {
    const del = h('button', { type: 'button', id: 'delete-module', class: 'danger' }, 'Delete module');
    const keep = h('button', { type: 'button', id: 'delete-module-keep', class: 'danger secondary' },
      'Delete now, keeping its spool as dead letters');
    main.append(h('section', { class: 'danger-zone', 'aria-labelledby': 'delete-heading' },
      h('h2', { id: 'delete-heading' }, 'Delete'),
      h('p', {}, 'Records still in its spool are sent to Kinesis first; then the module goes.'), del,
      h('p', {}, 'If its stream cannot take them (it is gone, or refuses them), delete it at once ' +
        'instead: they are kept as the dead letters of ' + id + ', for a module of that ID to replay.'), keep));
    const remove = async (button, query, question) => {
      if (!window.confirm(question)) return;
      button.disabled = true;
      try {
        const r = await api('DELETE', '/api/modules/' + enc(id) + query);
        if (!p.alive) return;
        if (r.ok && r.data) {
          const d = r.data;
          flash(d.state === 'draining'
            ? 'Module ' + d.id + ' is draining ' + fmtNum(d.spool_records) + ' records, then it goes'
            : 'Module ' + d.id + ' deleted' + (d.kept_as_dead_letters
              ? ', ' + fmtNum(d.kept_as_dead_letters) + ' records kept as dead letters' : ''), '#/');
          return;
        }
        showAlert(err, httpError(r));
      } catch (e) {
        if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
      } finally {
        button.disabled = false;
      }
    };
    del.addEventListener('click', () => remove(del, '',
      'Delete module ' + id + '? Records still in its spool are sent first, then it goes.'));
    keep.addEventListener('click', () => remove(keep, '?spool=dead-letters',
      'Delete module ' + id + ' now? Records still in its spool are not sent: they are kept as its dead letters.'));
  }
}

// ---- logs ----

function pageLogs(p, id) {
  const main = mount('Logs of ' + id, 'modules');
  const level = h('select', { id: 'log-level' },
    h('option', { value: 'info' }, 'INFO'), h('option', { value: 'warn' }, 'WARN'), h('option', { value: 'error' }, 'ERROR'));
  const live = h('input', { type: 'checkbox', id: 'log-live', checked: true });
  const refresh = h('button', { type: 'button', class: 'secondary' }, 'Refresh');
  const err = alertBox('logs-error');
  const tbody = h('tbody');
  const table = h('table', { id: 'log-table' }, headRow(['Time', 'Level', 'Message']), tbody);
  main.append(moduleNav(id, 'logs'),
    h('div', { class: 'toolbar' },
      h('div', { class: 'field inline' }, h('label', { for: 'log-level' }, 'Level (and above)'), level),
      h('div', { class: 'field check' }, live, h('label', { for: 'log-live' }, 'Live')),
      refresh),
    err, tableWrap(table, 'Log entries'));

  let seq = 0, last = null, stop = null;
  const load = async () => {
    const mine = ++seq;
    let list;
    try { list = await getJson(`/api/modules/${enc(id)}/logs?level=${level.value}&limit=500`); } catch (e) {
      if (p.alive && mine === seq && !(e instanceof AuthLost)) showAlert(err, e);
      return;
    }
    if (!p.alive || mine !== seq) return;
    showAlert(err, null);
    const key = level.value + JSON.stringify(list);
    if (key === last) return; // unchanged: keep any text selection
    last = key;
    const rows = list.slice().reverse().map((e) => {
      const lv = String(e.level || '').toLowerCase();
      return h('tr', { 'data-level': lv, class: 'level-' + lv },
        h('td', { class: 'nowrap' }, timeEl(e.time)),
        h('td', {}, h('span', { class: 'level' }, lv.toUpperCase())),
        h('td', { class: 'message' }, e.message == null ? '' : String(e.message)));
    });
    tbody.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 3 }, 'No entries.'))]));
  };
  const setLive = () => {
    if (stop) { stop(); stop = null; }
    if (live.checked) stop = p.poll(load, POLL_MS); else load();
  };
  level.addEventListener('change', () => { last = null; load(); });
  live.addEventListener('change', setLive);
  refresh.addEventListener('click', load);
  setLive();
}

// ---- dead letters ----

function decodeBase64(b64) {
  const bin = atob(b64 || '');
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

// The bytes as text, or null when they are not UTF-8 or hold control characters.
function asText(bytes) {
  let s;
  try { s = new TextDecoder('utf-8', { fatal: true }).decode(bytes); } catch (e) { return null; }
  return /[\u0000-\u0008\u000B-\u001F\u007F-\u009F]/.test(s.replace(/\r\n/g, '\n')) ? null : s;
}

function hexDump(bytes) {
  const n = Math.min(bytes.length, HEX_LIMIT);
  const lines = [];
  for (let off = 0; off < n; off += 16) {
    const row = bytes.subarray(off, Math.min(off + 16, n));
    const hex = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(off.toString(16).padStart(8, '0') + '  ' + hex.padEnd(47) + '  ' + ascii);
  }
  if (bytes.length > n) lines.push(`… first ${fmtNum(n)} of ${fmtNum(bytes.length)} bytes shown`);
  return lines.join('\n');
}

function dataView(letter) {
  const bytes = decodeBase64(letter.data_base64);
  const text = asText(bytes);
  const pre = h('pre', { class: 'data' });
  const bText = h('button', { type: 'button', class: 'secondary small' }, 'Text');
  const bHex = h('button', { type: 'button', class: 'secondary small' }, 'Hex');
  const show = (asHex) => {
    pre.textContent = bytes.length === 0 ? '(empty)'
      : asHex ? hexDump(bytes) : (text != null ? text : new TextDecoder().decode(bytes));
    bText.setAttribute('aria-pressed', String(!asHex));
    bHex.setAttribute('aria-pressed', String(asHex));
  };
  bText.addEventListener('click', () => show(false));
  bHex.addEventListener('click', () => show(true));
  show(text == null);
  const meta = [];
  if (letter.partition_key != null) meta.push('Partition key: ' + letter.partition_key);
  if (letter.record_index != null) meta.push('Record index: ' + letter.record_index);
  return h('div', { class: 'letter-data' },
    meta.length ? h('p', { class: 'hint' }, meta.join(' · ')) : null,
    h('div', { class: 'toggle', role: 'group', 'aria-label': 'Show data as' }, bText, bHex), pre);
}

function pageDeadLetters(p, id) {
  const main = mount('Dead letters of ' + id, 'modules');
  const base = `/api/modules/${enc(id)}/dead-letters`;
  const err = alertBox('letters-error');
  const tbody = h('tbody');
  const all = h('input', { type: 'checkbox', id: 'select-all', 'aria-label': 'Select all shown' });
  const table = h('table', { id: 'dead-letters-table' },
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, all),
      ['ID', 'Time', 'Topic', 'Reason', 'Size', 'Data'].map((c) => h('th', { scope: 'col' }, c)))), tbody);
  const btn = (bid, label, cls) => h('button', { type: 'button', id: bid, class: cls }, label);
  const replaySel = btn('replay-selected', 'Replay selected', 'secondary');
  const replayAll = btn('replay-all', 'Replay all', 'secondary');
  const purgeSel = btn('purge-selected', 'Purge selected', 'danger');
  const purgeAll = btn('purge-all', 'Purge all', 'danger');
  const more = h('button', { type: 'button', id: 'more-letters', class: 'secondary', hidden: true }, 'More');
  const summary = h('p', { class: 'hint', id: 'letters-summary' });
  main.append(moduleNav(id, 'dead-letters'),
    h('div', { class: 'toolbar' }, replaySel, replayAll, purgeSel, purgeAll),
    err, summary, tableWrap(table, 'Dead letters'), h('p', {}, more));

  const selected = new Set();
  let after = 0, ended = false, shown = 0, busy = false, gen = 0;

  const syncButtons = () => {
    replaySel.disabled = purgeSel.disabled = selected.size === 0;
    const boxes = tbody.querySelectorAll('input[type="checkbox"]');
    all.checked = boxes.length > 0 && selected.size === boxes.length;
    summary.textContent = `${fmtNum(shown)} shown${ended ? '' : ' (more follow)'}, ${fmtNum(selected.size)} selected.`;
  };

  const letterRow = (l) => {
    const box = h('input', { type: 'checkbox', 'aria-label': 'Select dead letter ' + l.id });
    box.addEventListener('change', () => { if (box.checked) selected.add(l.id); else selected.delete(l.id); syncButtons(); });
    const showBtn = h('button', { type: 'button', class: 'secondary small', 'aria-expanded': 'false',
      'aria-label': 'Show data of dead letter ' + l.id }, 'Show');
    const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: 7 }));
    showBtn.addEventListener('click', async () => {
      if (!detail.hidden) { detail.hidden = true; showBtn.textContent = 'Show'; showBtn.setAttribute('aria-expanded', 'false'); return; }
      const cell = detail.firstChild;
      if (!cell.firstChild) {
        let full = l;
        if (l.data_omitted || l.data_base64 == null) {
          showBtn.disabled = true;
          try { full = await getJson(`${base}/${l.id}`); } catch (e) {
            if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
            return;
          } finally { showBtn.disabled = false; }
          if (!p.alive) return;
        }
        try { cell.append(dataView(full)); } catch (e) { showAlert(err, 'Dead letter ' + l.id + ': its data cannot be decoded.'); return; }
      }
      detail.hidden = false;
      showBtn.textContent = 'Hide';
      showBtn.setAttribute('aria-expanded', 'true');
    });
    const tr = h('tr', { 'data-letter': l.id },
      h('td', {}, box), h('td', { class: 'num' }, l.id), h('td', { class: 'nowrap' }, timeEl(l.time)),
      h('td', { class: 'mono' }, l.topic || ''), h('td', {}, l.reason || ''),
      h('td', { class: 'num nowrap' }, fmtBytes(l.data_bytes)), h('td', {}, showBtn));
    return [tr, detail];
  };

  // Loads up to a page of letters: the API may cut a page short for its
  // size, so short pages are followed until one is empty.
  const loadMore = async () => {
    if (busy || ended) return;
    busy = true;
    more.disabled = true;
    const mine = gen;
    let got = 0;
    try {
      while (got < LETTER_PAGE) {
        const list = await getJson(`${base}?after=${after}&limit=${LETTER_PAGE}`);
        if (!p.alive || mine !== gen) return;
        if (!list.length) { ended = true; break; }
        if (tbody.querySelector('tr.empty')) tbody.replaceChildren();
        for (const l of list) tbody.append(...letterRow(l));
        after = list[list.length - 1].id;
        got += list.length;
        shown += list.length;
        if (list.length >= LETTER_PAGE) break;
      }
      showAlert(err, null);
    } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
    } finally {
      if (mine === gen) busy = false;
    }
    if (!p.alive || mine !== gen) return;
    if (!shown) tbody.replaceChildren(h('tr', { class: 'empty' }, h('td', { colspan: 7 }, 'No dead letters.')));
    more.hidden = ended;
    more.disabled = false;
    syncButtons();
  };

  const reload = () => {
    gen++;
    busy = false;
    after = 0; ended = false; shown = 0;
    selected.clear();
    tbody.replaceChildren();
    loadMore();
  };

  const act = async (kind, ids) => {
    const what = ids ? `${ids.length} selected dead letter${ids.length === 1 ? '' : 's'}` : 'all dead letters';
    const question = kind === 'replay'
      ? `Replay ${what} of ${id}? They are sent through the module again.`
      : `Purge ${what} of ${id}? They are deleted for good.`;
    if (!window.confirm(question)) return;
    const q = ids ? '?ids=' + ids.join(',') : '';
    try {
      const r = kind === 'replay' ? await api('POST', `${base}/replay${q}`) : await api('DELETE', base + q);
      if (!p.alive) return;
      if (!r.ok || !r.data) { showAlert(err, r.status === 409 ? r.text.trim() : httpError(r)); return; }
      showAlert(err, null);
      const n = fmtNum(r.data.count);
      notice(kind === 'replay' ? `Replaying ${n} dead letters of ${id}` : `Purged ${n} dead letters of ${id}`);
      p.later(reload, 1000);
    } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
    }
  };
  const sel = () => [...selected].sort((a, b) => a - b);
  replaySel.addEventListener('click', () => act('replay', sel()));
  replayAll.addEventListener('click', () => act('replay', null));
  purgeSel.addEventListener('click', () => act('purge', sel()));
  purgeAll.addEventListener('click', () => act('purge', null));
  more.addEventListener('click', loadMore);
  all.addEventListener('change', () => {
    for (const tr of tbody.querySelectorAll('tr[data-letter]')) {
      const box = tr.querySelector('input[type="checkbox"]');
      box.checked = all.checked;
      const lid = Number(tr.dataset.letter);
      if (all.checked) selected.add(lid); else selected.delete(lid);
    }
    syncButtons();
  });
  syncButtons();
  reload();
}

// ---- component ----

function pageComponent(p, id) {
  const main = mount('Component of ' + id, 'modules');
  const err = alertBox('component-error');
  const info = h('div', { id: 'component-info' }, h('p', {}, 'Loading…'));
  const reloadBtn = h('button', { type: 'button', id: 'reload-components' }, 'Reload components');
  const results = h('section', { id: 'reload-results', 'aria-labelledby': 'reload-heading', hidden: true });
  main.append(moduleNav(id, 'component'), err, info,
    h('p', { class: 'hint' }, 'Reloading loads every component whose file changed, checks it and swaps it in; a module whose new component fails keeps the running one.'),
    h('p', {}, reloadBtn), results);

  const load = async () => {
    let m;
    try { m = await getJson('/api/modules/' + enc(id)); } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
      return;
    }
    if (!p.alive) return;
    const c = m.component;
    if (!c) { info.replaceChildren(h('p', {}, 'No component is loaded for this module.')); return; }
    const row = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    info.replaceChildren(h('dl', { class: 'facts' },
      row('Path', h('code', {}, c.path || '')),
      row('SHA-256', h('code', { class: 'hash' }, c.sha256 || '')),
      row('Loaded at', timeEl(c.loaded_at)),
      row('Load time', fmtNum(c.load_ms) + ' ms'),
      row('Contract', c.contract || '–')));
  };

  reloadBtn.addEventListener('click', async () => {
    reloadBtn.disabled = true;
    try {
      const r = await api('POST', '/api/component/reload');
      if (!p.alive) return;
      if ((r.status !== 200 && r.status !== 422) || !Array.isArray(r.data)) { showAlert(err, httpError(r)); return; }
      const list = r.data;
      const count = (o) => list.filter((x) => x.outcome === o).length;
      const msg = `Components reloaded: ${count('swapped')} swapped, ${count('unchanged')} unchanged, ${count('failed')} failed`;
      showAlert(err, r.status === 422 ? msg + '. A module whose component failed keeps the one it ran.' : null);
      notice(msg);
      const rows = list.map((o) => h('tr', { 'data-outcome': o.outcome, class: 'outcome-' + o.outcome },
        h('td', { class: 'mono' }, o.path || ''), h('td', {}, (o.modules || []).join(', ')),
        h('td', {}, h('span', { class: 'level' }, o.outcome || '')),
        h('td', { class: 'mono hash' }, o.sha256 || '–'), h('td', { class: 'message' }, o.error || '')));
      results.replaceChildren(h('h2', { id: 'reload-heading' }, 'Reload outcome'),
        tableWrap(h('table', { id: 'reload-table' }, headRow(['Path', 'Modules', 'Outcome', 'SHA-256', 'Error']),
          h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 5 }, 'No components.')))), 'Reload outcome'));
      results.hidden = false;
      load();
    } catch (e) {
      if (p.alive && !(e instanceof AuthLost)) showAlert(err, e);
    } finally {
      reloadBtn.disabled = false;
    }
  });
  load();
}

// ---- host health ----

function pageHealth(p) {
  const main = mount('Host health', 'health');
  const err = alertBox('health-error');
  const state = h('dl', { class: 'facts', id: 'health-state' });
  const tbody = h('tbody');
  const table = h('table', { id: 'health-table' },
    headRow(['Module', 'Spool', 'Spool records', 'Kinesis errors', 'Throttled']), tbody);
  main.append(err, h('section', { id: 'health' }, state, h('h2', {}, 'Modules'), tableWrap(table, 'Module health')));
  let lastModules = null;
  p.poll(async () => {
    const [health, modules] = await Promise.allSettled([api('GET', '/api/health'), getJson('/api/modules')]);
    if (!p.alive) return;
    const problems = [];
    if (health.status === 'fulfilled' && health.value.data) {
      const d = health.value.data;
      const yes = (b, t, f) => h('span', { class: b ? 'good' : 'bad' }, b ? t : f);
      state.replaceChildren(
        h('dt', {}, 'Host'), h('dd', { 'data-field': 'ready' }, yes(health.value.status === 200 && d.ready, 'Ready', 'Not ready')),
        h('dt', {}, 'MQTT broker'), h('dd', { 'data-field': 'mqtt_connected' }, yes(d.mqtt_connected, 'Connected', 'Not connected')));
    } else {
      problems.push(health.status === 'rejected' ? health.reason.message : httpError(health.value).message);
    }
    if (modules.status === 'fulfilled') {
      const key = JSON.stringify(modules.value);
      if (key !== lastModules) {
        lastModules = key;
        const rows = modules.value.map((m) => {
          const c = m.counters || {};
          const max = m.spool_max_bytes || 0;
          const used = c.spool_bytes || 0;
          const pct = max ? Math.min(100, (used / max) * 100) : 0;
          const text = `${fmtBytes(used)} of ${fmtBytes(max)} (${pct < 1 && used ? '<1' : Math.round(pct)} %)`;
          return h('tr', { 'data-module': m.id },
            h('th', { scope: 'row' }, m.id),
            h('td', { 'data-field': 'spool', class: 'nowrap' },
              h('progress', { max: max || 1, value: used, 'aria-label': 'Spool of ' + m.id + ': ' + text }), ' ', text),
            h('td', { class: 'num', 'data-field': 'spool_records' }, fmtNum(c.spool_records)),
            h('td', { class: 'num', 'data-field': 'kinesis_errors' }, fmtNum(m.kinesis_errors)),
            h('td', { class: 'num', 'data-field': 'throttled' }, fmtNum(c.throttled)));
        });
        tbody.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 5 }, 'No modules.'))]));
      }
    } else if (!(modules.reason instanceof AuthLost)) {
      problems.push(modules.reason.message);
    }
    showAlert(err, problems.length ? problems : null);
  }, POLL_MS);
}

// ---- start ----

document.addEventListener('DOMContentLoaded', () => {
  $('#sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    notice('Signed out');
    leavePage();
    start();
  });
  $('#skip-link').addEventListener('click', (ev) => { ev.preventDefault(); $('#main').focus(); });
  window.addEventListener('hashchange', route);
  start();
});
