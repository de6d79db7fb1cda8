// Drives Debian's Chromium through the ksm console, as an operator would:
// signs in, creates a module through the form, watches its records and
// logs, finds an ERROR, replays a dead letter, changes the module's
// subscriptions and sees them take effect, checks the component and the
// host's health, and deletes the module. Each step asserts on what the page
// shows, and writes a screenshot.
//
// Run by the integration test `console::the_console_does_what_an_operator_needs`,
// which starts the broker, moto and ksm and sets:
//   KSM_CONSOLE_URL   the admin listener, e.g. http://127.0.0.1:8686/
//   KSM_ADMIN_TOKEN   the admin token
//   KSM_BROKER        host:port of the MQTT broker
//   KSM_STREAM        the stream the new module forwards to
//   KSM_FIRST_MODULE  the module the host started with
//   KSM_SCREENSHOTS   where the screenshots go
//   KSM_CHROMIUM      the browser (default /usr/bin/chromium)

import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env('KSM_CONSOLE_URL');
const token = env('KSM_ADMIN_TOKEN');
const [brokerHost, brokerPort] = env('KSM_BROKER').split(':');
const stream = env('KSM_STREAM');
const first = env('KSM_FIRST_MODULE');
const shots = env('KSM_SCREENSHOTS');
const made = 'console-made';
const WAIT = 20000;
mkdirSync(shots, { recursive: true });

let step = 0;
async function shot(page, name) {
  step += 1;
  await page.screenshot({ path: `${shots}/${String(step).padStart(2, '0')}-${name}.png`, fullPage: true });
}

function say(text) {
  process.stdout.write(`console: ${text}\n`);
}

function publish(topic, message) {
  execFileSync('mosquitto_pub', ['-h', brokerHost, '-p', brokerPort, '-q', '1', '-t', topic, '-m', message]);
}

function event(type, n) {
  return JSON.stringify({ eventType: type, eventData: { n } });
}

// The number a modules-table cell shows.
async function count(page, id, field) {
  const text = await page.locator(`tr[data-module="${id}"] [data-field="${field}"]`).textContent();
  return Number((text || '').replace(/[^0-9]/g, ''));
}

async function waitForCount(page, id, field, atLeast) {
  await page.waitForFunction(
    ([id, field, atLeast]) => {
      const cell = document.querySelector(`tr[data-module="${id}"] [data-field="${field}"]`);
      return cell && Number(cell.textContent.replace(/[^0-9]/g, '')) >= atLeast;
    },
    [id, field, atLeast],
    { timeout: WAIT },
  );
}

async function expectText(locator, text) {
  await locator.filter({ hasText: text }).first().waitFor({ timeout: WAIT });
}

async function openModules(page) {
  await page.goto(`${url}#/`);
  await page.locator('#modules-table').waitFor({ timeout: WAIT });
}

async function fillForm(page, fields) {
  for (const [name, value] of Object.entries(fields)) {
    const input = page.locator(`#field-${name}`);
    if (typeof value === 'boolean') await input.setChecked(value);
    else await input.fill(value);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.KSM_CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, timezoneId: 'Asia/Tokyo' });
  const page = await context.newPage();
  const dialogs = [];
  page.on('dialog', (dialog) => { dialogs.push(dialog.message()); dialog.accept(); });
  const failures = [];
  page.on('pageerror', (error) => failures.push(error.message));

  // Sign in: a wrong token is refused, the right one lets in, and it is in no URL.
  await page.goto(url);
  await page.locator('#login-form').waitFor({ timeout: WAIT });
  await shot(page, 'login');
  await page.fill('#token', 'not-the-admin-token-at-all');
  await page.press('#token', 'Enter');
  await expectText(page.locator('#main'), 'That token was refused.');
  await page.fill('#token', token);
  await page.press('#token', 'Enter');
  await page.locator(`tr[data-module="${first}"]`).waitFor({ timeout: WAIT });
  if (page.url().includes(token)) throw new Error('the token is in the URL');
  const stored = await page.evaluate(() => sessionStorage.getItem('ksm-token'));
  if (stored !== token) throw new Error('the token is not kept in the session');
  await shot(page, 'modules');
  say('signed in');

  // The keyboard reaches "+ New" from the top of the page, and Enter opens the form.
  await page.locator('body').focus();
  let reached = false;
  for (let tab = 0; tab < 20 && !reached; tab += 1) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate(() => document.activeElement && document.activeElement.id === 'new-module');
  }
  if (!reached) throw new Error('Tab does not reach "+ New"');
  await page.keyboard.press('Enter');
  await page.locator('#module-form').waitFor({ timeout: WAIT });
  const labelled = await page.locator('#module-form input').evaluateAll((inputs) =>
    inputs.every((input) => input.labels && input.labels.length > 0));
  if (!labelled) throw new Error('an input of the form has no label');
  await page.goto(`${url}#/`);
  await page.locator(`tr[data-module="${first}"]`).waitFor({ timeout: WAIT });
  say('the keyboard reaches the form, and every input has a label');

  // A new module through the form: a bad stream name is shown at its field, then fixed.
  await page.click('#new-module');
  await page.locator('#module-form').waitFor({ timeout: WAIT });
  await fillForm(page, {
    id: made, description: 'made in the console', subscribe_events: '*',
    region: 'us-east-1', stream_name: 'not a stream name!',
  });
  await page.locator('#module-form button[type=submit]').click();
  await expectText(page.locator('#error-stream_name'), 'is not a valid stream name');
  const invalid = await page.locator('#field-stream_name').getAttribute('aria-invalid');
  if (invalid !== 'true') throw new Error('the bad field is not marked invalid');
  await shot(page, 'new-module-field-error');
  await fillForm(page, { stream_name: stream });
  await page.locator('#module-form button[type=submit]').click();
  await page.locator(`tr[data-module="${made}"]`).waitFor({ timeout: WAIT });
  await expectText(page.locator('#notice'), `Module ${made} saved`);
  say('module created through the form');

  // Its records are counted.
  for (let n = 0; n < 3; n += 1) publish('/devices/1001/event', event('status', n));
  await waitForCount(page, made, 'forwarded', 3);
  await shot(page, 'modules-counting');
  say('records counted');

  // A malformed payload: an ERROR under LOGS, filtered to ERROR, newest first.
  publish('/devices/1001/event', 'this is not json');
  await waitForCount(page, made, 'dead_lettered', 1);
  await page.goto(`${url}#/modules/${made}/logs`);
  await page.locator('#log-table').waitFor({ timeout: WAIT });
  await expectText(page.locator('#log-table'), 'created by the admin API');
  await page.selectOption('#log-level', { label: 'ERROR' });
  await expectText(page.locator('#log-table tr[data-level="error"]'), 'dead letter');
  const levels = await page.locator('#log-table tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.level));
  if (!levels.length || levels.some((level) => level !== 'error')) {
    throw new Error(`filtered to ERROR, the log shows ${levels}`);
  }
  // Times in the viewer's zone (the browser is set to Tokyo's), UTC kept in the markup.
  const time = page.locator('#log-table tbody tr time').first();
  const utc = await time.getAttribute('datetime');
  const local = await page.evaluate((u) => [
    new Date(u).toLocaleString(), Intl.DateTimeFormat().resolvedOptions().timeZone,
  ], utc);
  if ((await time.textContent()).trim() !== local[0] || local[1] !== 'Asia/Tokyo') {
    throw new Error(`the time ${await time.textContent()} (${utc}) is not ${local[0]} in ${local[1]}`);
  }
  await shot(page, 'logs-error');
  say('the ERROR is under LOGS');

  // The dead letter: shown as text, replayed (it fails again, and is kept again).
  await page.goto(`${url}#/modules/${made}/dead-letters`);
  const letter = page.locator('#dead-letters-table tbody tr[data-letter]').first();
  await letter.waitFor({ timeout: WAIT });
  await letter.getByRole('button', { name: 'Show' }).click();
  await expectText(page.locator('#dead-letters-table'), 'this is not json');
  await shot(page, 'dead-letter-shown');
  await page.click('#replay-all');
  await expectText(page.locator('#notice'), 'Replaying 1 dead letters');
  if (!dialogs.some((d) => d.toLowerCase().includes('replay'))) throw new Error('replay was not confirmed');
  await page.goto(`${url}#/modules/${made}/logs`);
  await expectText(page.locator('#log-table'), 'replay done: 1 of 1 dead letters');
  say('the dead letter was replayed');

  // Only `alert` events from now on: a `status` event is no longer forwarded.
  await page.goto(`${url}#/modules/${made}/edit`);
  await page.locator('#module-form').waitFor({ timeout: WAIT });
  const loaded = await page.inputValue('#field-stream_name');
  if (loaded !== stream) throw new Error(`the form shows stream ${loaded}`);
  await fillForm(page, { subscribe_events: 'alert' });
  await shot(page, 'edit-module');
  await page.locator('#module-form button[type=submit]').click();
  await page.locator(`tr[data-module="${made}"]`).waitFor({ timeout: WAIT });
  const before = await count(page, made, 'forwarded');
  const firstBefore = await count(page, first, 'forwarded');
  publish('/devices/1001/event', event('status', 10));
  publish('/devices/1001/event', event('alert', 11));
  await waitForCount(page, first, 'forwarded', firstBefore + 2);
  await waitForCount(page, made, 'forwarded', before + 1);
  await page.waitForTimeout(1000);
  const after = await count(page, made, 'forwarded');
  if (after !== before + 1) throw new Error(`after the edit the module forwarded ${after - before}, not 1`);
  say('the new subscriptions took effect');

  // Its component, and a reload that finds nothing new.
  await page.goto(`${url}#/modules/${made}/component`);
  await expectText(page.locator('#component-info'), 'ksm_guest.wasm');
  await page.locator('#component-info').filter({ hasText: /[0-9a-f]{64}/ }).waitFor({ timeout: WAIT });
  await page.click('#reload-components');
  await expectText(page.locator('#reload-results'), 'unchanged');
  await shot(page, 'component');

  // The host's health.
  await page.goto(`${url}#/health`);
  await expectText(page.locator('#health'), made);
  await page.locator('#health-state').filter({ hasText: /connected/i }).waitFor({ timeout: WAIT });
  await shot(page, 'health');
  say('component and health shown');

  // Deleted, with a confirmation: it leaves the list.
  await page.goto(`${url}#/modules/${made}/edit`);
  await page.click('#delete-module');
  if (!dialogs.some((d) => d.includes(`Delete module ${made}`))) throw new Error('the delete was not confirmed');
  await expectText(page.locator('#notice'), made);
  await page.locator(`tr[data-module="${made}"]`).waitFor({ state: 'detached', timeout: WAIT });
  await page.locator(`tr[data-module="${first}"]`).waitFor({ timeout: WAIT });
  await shot(page, 'deleted');
  say('module deleted');

  // Readable at 200 % zoom: nothing wider than the window but the tables' own scrollers.
  await page.setViewportSize({ width: 640, height: 900 });
  await page.evaluate(() => { document.body.style.zoom = '2'; });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  await shot(page, 'modules-zoomed');
  if (overflow > 2) throw new Error(`at 200 % zoom the page is ${overflow} px wider than the window`);

  if (failures.length) throw new Error(`the page threw: ${failures.join('; ')}`);
  say('every step passed');
} finally {
  await browser.close();
}
