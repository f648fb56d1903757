// Real-Chromium tests: the built JS client in a page, and the console, against real brokers.
//
// Driven by tests/browser.rs, which owns every process (brokers through the control API of
// tests/support/control.rs, a private redis-server) and serves the test page and the built
// client under /files/. Chromium is Debian's (never downloaded): puppeteer-core drives it.
//
//   TIDINGS_TEST_CONTROL    the control API (brokers, /files/pages/…, /files/client/index.js)
//   TIDINGS_TEST_REDIS_URL  the private Redis (the restart test's log outlives the broker)
//   TIDINGS_TEST_CHROMIUM   the Chromium binary
//   TIDINGS_TEST_ARTIFACTS  where screenshots go (target/browser-artifacts)
//
// Each test prints `SAW: …` lines: what the browser showed, for the closing note.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import puppeteer from 'puppeteer-core';
import { controlApi, sleep, waitFor as waitForBounded } from '../support/control.mjs';

const CONTROL = process.env.TIDINGS_TEST_CONTROL;
const REDIS_URL = process.env.TIDINGS_TEST_REDIS_URL;
const CHROMIUM = process.env.TIDINGS_TEST_CHROMIUM;
const ARTIFACTS = process.env.TIDINGS_TEST_ARTIFACTS;
if (!CONTROL || !REDIS_URL || !CHROMIUM || !ARTIFACTS) {
  throw new Error('run through tests/browser.rs: TIDINGS_TEST_CONTROL, _REDIS_URL, _CHROMIUM and _ARTIFACTS must be set');
}
mkdirSync(ARTIFACTS, { recursive: true });

const WAIT_MS = 20_000;
const control = controlApi(CONTROL);
const broker = control.broker;
let browser;

before(async () => {
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a container: Chromium's sandbox needs user namespaces it may not have.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  console.log(`SAW: ${await browser.version()}`);
});

after(async () => {
  await browser?.close();
  await control.stopAll();
});

const waitFor = (what, cond, ms = WAIT_MS) => waitForBounded(what, cond, ms);

async function post(http, body, key) {
  const res = await fetch(`${http}/v1/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 202, text);
  return JSON.parse(text);
}

/** A new page that fails the test on any uncaught page error. */
async function newPage() {
  const page = await browser.newPage();
  await page.setViewport({ width: 1200, height: 900 });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.errors = errors;
  return page;
}

async function screenshot(page, name) {
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path, fullPage: true });
  console.log(`SAW: screenshot ${path}`);
}

const itemsIn = (page) => page.$$eval('#items li', (lis) => lis.map((li) => li.textContent));
const text = (page, sel) => page.$eval(sel, (el) => el.textContent);

function livePage(b, collection, filter) {
  const q = new URLSearchParams({ ws: b.ws, collection, filter: JSON.stringify(filter) });
  return `${CONTROL}/files/pages/live.html?${q}`;
}

test('a page with a filtered live view shows exactly the matching items', async () => {
  const b = await broker([]);
  const page = await newPage();
  await page.goto(livePage(b, 'orders', { status: { _eq: 'paid' } }));
  await waitFor('the view to open', async () => (await text(page, '#state')) === 'open');

  // Random creates, updates (status kept, amount changed) and deletes, published over HTTP.
  let seed = Number(process.env.TIDINGS_TEST_SEED ?? Date.now() % 1_000_000);
  console.log(`SAW: seed ${seed}`);
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const model = new Map();
  for (let step = 0, id = 1; step < 60; step++) {
    const keys = [...model.keys()];
    const r = rand();
    if (keys.length < 4 || r < 0.55) {
      const it = { id: id++, status: ['paid', 'open', 'void'][Math.floor(rand() * 3)], amount: Math.floor(rand() * 100) };
      model.set(it.id, it);
      await post(b.http, { collection: 'orders', event: 'create', data: it });
    } else if (r < 0.8) {
      const it = { ...model.get(keys[Math.floor(rand() * keys.length)]), amount: Math.floor(rand() * 100) };
      model.set(it.id, it);
      await post(b.http, { collection: 'orders', event: 'update', data: it });
    } else {
      const k = keys[Math.floor(rand() * keys.length)];
      model.delete(k);
      await post(b.http, { collection: 'orders', event: 'delete', keys: [k] });
    }
  }
  const expected = [...model.values()].filter((it) => it.status === 'paid').sort((x, y) => x.id - y.id)
    .map((it) => `${it.id} paid ${it.amount}`);
  const all = model.size;
  await waitFor('the DOM to show the paid items', async () =>
    JSON.stringify(await itemsIn(page)) === JSON.stringify(expected), WAIT_MS).catch(async (e) => {
    assert.deepEqual(await itemsIn(page), expected, e.message);
  });
  // Quiet: nothing else arrives.
  await sleep(300);
  assert.deepEqual(await itemsIn(page), expected);
  assert.deepEqual(page.errors, []);
  assert.deepEqual(await page.evaluate(() => window.tidings.errors), []);
  console.log(`SAW: live view shows ${expected.length} paid items of ${all} held (60 random events): ${expected.join(' | ')}`);
  await screenshot(page, 'live-view.png');
  await page.close();
});

test('a live view in a page survives a broker restart (redis engine: resumed, no loss)', async () => {
  const prefix = `browser_${process.pid}_${randomBytes(4).toString('hex')}`;
  const b = await broker(['--engine', 'redis', '--redis-url', REDIS_URL, '--key-prefix', prefix, '--shutdown-delay', '0']);
  const page = await newPage();
  await page.goto(livePage(b, 'tickets', { kind: { _eq: 'a' } }));
  await waitFor('the view to open', async () => (await text(page, '#state')) === 'open');
  const item = (id) => ({ id, kind: id % 2 ? 'a' : 'b', status: 'new', amount: id });
  for (let id = 1; id <= 10; id++) await post(b.http, { collection: 'tickets', event: 'create', data: item(id) });
  const ids = async () => (await page.$$eval('#items li', (lis) => lis.map((li) => Number(li.dataset.id))));
  await waitFor('items 1..9', async () => (await ids()).length === 5);

  await control.restart(b.id);
  await waitFor('/readyz 200', async () => (await fetch(`${b.http}/readyz`)).status === 200);
  for (let id = 11; id <= 20; id++) await post(b.http, { collection: 'tickets', event: 'create', data: item(id) });
  const odd = [...Array(10).keys()].map((i) => 2 * i + 1);
  await waitFor('all odd items of 1..20', async () => JSON.stringify(await ids()) === JSON.stringify(odd))
    .catch(async (e) => assert.deepEqual(await ids(), odd, e.message));
  const seen = await page.evaluate(() => ({
    states: window.tidings.states,
    resets: window.tidings.resets,
    connects: window.tidings.client.connects,
    errors: window.tidings.errors,
  }));
  assert.equal(seen.resets, 0, 'resumed, not reset');
  assert.ok(seen.connects >= 2, `reconnected (${seen.connects} connects)`);
  assert.ok(seen.states.includes('reconnecting'));
  assert.equal(seen.states.at(-1), 'open');
  assert.deepEqual(seen.errors, []);
  assert.deepEqual(page.errors, []);
  console.log(`SAW: after the restart the page shows ${odd.length} items (${odd.join(',')}), states ${seen.states.join('>')}, ${seen.connects} connects, 0 resets`);
  await screenshot(page, 'live-view-restart.png');
  await page.close();
});

test('the console: figures move with traffic, the tail shows published events, the form publishes', async () => {
  const adminKey = `admin-${randomBytes(12).toString('hex')}`;
  const publishKey = `pub-${randomBytes(12).toString('hex')}`;
  const b = await broker(['--admin-key', adminKey, '--publish-key', publishKey]);
  const page = await newPage();
  await page.goto(`${b.http}/console`);
  // Without the key the page shows no figures.
  await waitFor('the key request', async () => (await text(page, '#status')).includes('admin key'));
  assert.equal(await text(page, '#fig-connections'), '–');
  await page.type('#admin-key', adminKey);
  await page.$eval('#admin-key', (el) => el.dispatchEvent(new Event('change')));
  await waitFor('the figures', async () => (await text(page, '#fig-connections')) === '0');
  assert.equal(await text(page, '#fig-published-total'), '0');
  assert.match(await text(page, '#fig-backplane'), /^memory ready$/);

  // The live tail: a filtered subscription over the WebSocket (public mode: no token).
  await page.type('#tail-collection', 'orders');
  await page.type('#tail-filter', '{"status":{"_eq":"paid"}}');
  await page.click('#tail-start');
  await waitFor('the tail to open', async () => (await text(page, '#tail-state')) === 'open');
  await waitFor('the tail in the collections table', async () =>
    (await page.$$('#collections tr[data-collection="orders"]')).length === 1);
  assert.equal(await text(page, '#fig-connections'), '1');
  assert.equal(await text(page, '#fig-subscriptions'), '1');

  // Traffic over HTTP: 10 events, 5 of them paid, over about two seconds.
  let peakRate = 0;
  for (let id = 1; id <= 10; id++) {
    await post(b.http, { collection: 'orders', event: 'create', data: { id, status: id % 2 ? 'paid' : 'open' } }, publishKey);
    await sleep(200);
    peakRate = Math.max(peakRate, Number(await text(page, '#fig-publishes')));
  }
  await waitFor('the published total', async () => (await text(page, '#fig-published-total')) === '10');
  await waitFor('a publish rate', async () => {
    peakRate = Math.max(peakRate, Number(await text(page, '#fig-publishes')));
    return peakRate > 0;
  });
  const tail = async () => page.$$eval('#tail-list li[data-event="create"]', (lis) => lis.map((li) => li.textContent));
  await waitFor('5 tail entries', async () => (await tail()).length === 5);
  const entries = await tail();
  assert.ok(entries.every((e) => e.includes('"status":"paid"')), entries.join('\n'));
  assert.deepEqual(entries.map((e) => JSON.parse(e.slice(e.indexOf('['))).map((i) => i.id)).flat(), [9, 7, 5, 3, 1]);
  const deliveries = Number(await text(page, '#fig-deliveries-total'));
  assert.ok(deliveries >= 5, `${deliveries} deliveries`);
  const points = await page.$eval('#chart-publishes polyline', (el) => el.getAttribute('points'));
  assert.ok(points.split(' ').length >= 2, `the chart has points: ${points}`);

  // The publish form: refused without the publish key (nothing published), then accepted.
  await page.type('#pub-collection', 'orders');
  await page.select('#pub-event', 'create');
  await page.$eval('#pub-data', (el) => { el.value = '{"id": 999, "status": "paid"}'; });
  await page.click('#pub-send');
  await waitFor('the refusal', async () => (await text(page, '#pub-result')).startsWith('refused'));
  assert.match(await text(page, '#pub-result'), /publish key/);
  await page.type('#pub-key', publishKey);
  await page.click('#pub-send');
  await waitFor('the publish', async () => (await text(page, '#pub-result')).startsWith('published'));
  await waitFor('the form\'s event in the tail', async () => (await tail()).some((e) => e.includes('"id":999')));
  await waitFor('11 events published', async () => (await text(page, '#fig-published-total')) === '11');
  assert.deepEqual(page.errors, []);
  console.log(`SAW: console figures: published 0 -> 11, peak ${peakRate} publishes/s, ${deliveries} deliveries; tail showed ${entries.length} paid creates (ids 1,3,5,7,9) and the form's id 999; a form publish without the key was refused and published nothing`);
  await screenshot(page, 'console.png');
  await page.close();
});
