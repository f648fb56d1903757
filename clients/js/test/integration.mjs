// Integration tests of the built client (dist/) against real `tidings serve` processes.
//
// Driven by tests/js_client.rs, which owns every process: it runs a private redis-server and a
// small control API through which these tests start, restart and stop brokers (each one a
// `tidings serve --listen 127.0.0.1:0` child; a restart binds the same address again).
//
//   TIDINGS_TEST_CONTROL    http://127.0.0.1:PORT of the control API
//   TIDINGS_TEST_REDIS_URL  redis://127.0.0.1:PORT (private to this run)
//   TIDINGS_TEST_JWT_SECRET the HS256 secret tokens are signed with here
//
// Run: node --experimental-websocket --test test/integration.mjs (with those variables set).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import net from 'node:net';
import { connect, publish } from '../dist/index.js';
import { accepted, controlApi, metric, sleep, waitFor } from '../../../tests/support/control.mjs';

const CONTROL = process.env.TIDINGS_TEST_CONTROL;
const REDIS_URL = process.env.TIDINGS_TEST_REDIS_URL;
const JWT_SECRET = process.env.TIDINGS_TEST_JWT_SECRET;
if (!CONTROL || !REDIS_URL || !JWT_SECRET) {
  throw new Error('run through tests/js_client.rs: TIDINGS_TEST_CONTROL, TIDINGS_TEST_REDIS_URL and TIDINGS_TEST_JWT_SECRET must be set');
}

const clients = [];
const control = controlApi(CONTROL);
const broker = control.broker;

function client(opts) {
  const c = connect(opts);
  clients.push(c);
  return c;
}

after(async () => {
  for (const c of clients) c.close();
  await control.stopAll();
});

function uniquePrefix(name) {
  return `js_${name}_${process.pid}_${randomBytes(4).toString('hex')}`;
}

/** Collects every frame of a subscription through its callback. */
function record(sub) {
  const frames = [];
  sub.on((m) => frames.push(m));
  return frames;
}

const ids = (frames, event) =>
  frames.filter((m) => m.event === event).flatMap((m) => (Array.isArray(m.data) ? m.data : [m.data])).map((d) => d.id);

function hs256(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', JWT_SECRET).update(head).digest('base64url')}`;
}


/**
 * Opens a bare WebSocket over TCP, subscribes, publishes `events` in one request and returns
 * the sizes of the socket reads that carried their frames: the broker writes the frames of one
 * publish in one flush, which is what a client must cope with.
 */
async function rawReads(b, collection, events) {
  const url = new URL(b.ws);
  const sock = net.connect(Number(url.port), url.hostname);
  const chunks = [];
  let buf = Buffer.alloc(0);
  let upgraded = false;
  let onData = () => {};
  sock.on('data', (d) => {
    if (!upgraded) {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      upgraded = true;
      const rest = buf.subarray(end + 4);
      if (rest.length) chunks.push(rest);
    } else chunks.push(d);
    onData();
  });
  await new Promise((r, j) => { sock.once('connect', r); sock.once('error', j); });
  sock.write(`GET ${url.pathname} HTTP/1.1\r\nHost: ${url.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  const send = (obj) => {
    const payload = Buffer.from(JSON.stringify(obj));
    assert.ok(payload.length < 126);
    const mask = randomBytes(4);
    const head = Buffer.from([0x81, 0x80 | payload.length]);
    const body = Buffer.from(payload.map((byte, i) => byte ^ mask[i % 4]));
    sock.write(Buffer.concat([head, mask, body]));
  };
  await waitFor('the raw upgrade', () => upgraded);
  send({ type: 'subscribe', collection, uid: 'raw' });
  await waitFor('the raw init', () => Buffer.concat(chunks).includes('"event":"init"'));
  const before = chunks.length;
  await accepted(b.http, events);
  const count = () => (Buffer.concat(chunks.slice(before)).toString('latin1').match(/"event":"create"/g) ?? []).length;
  await waitFor('the raw frames', () => count() >= events.length);
  sock.destroy();
  return chunks.slice(before).map((c) => c.length);
}

test('frames that arrive in one socket read are all delivered, to iterators and callbacks', async () => {
  const b = await broker([]);
  const events = [1, 2, 3, 4, 5].map((id) => ({ collection: 'coalesce', event: 'create', data: { id, n: id } }));

  // What the broker does: the five frames of one publish come in one read on a bare socket.
  const reads = await rawReads(b, 'coalesce', events);
  assert.equal(reads.length, 1, `expected the 5 frames in one read, got reads of ${reads} bytes`);

  const c = client({ url: b.ws });
  const iterated = c.subscribe('coalesce');
  const called = record(c.subscribe('coalesce', { query: { filter: { n: { _gte: 0 } } } }));
  const seen = [];
  // A slow consumer: frames wait in the subscription's queue while it sleeps.
  const consumer = (async () => {
    for await (const m of iterated) {
      seen.push(m);
      if (seen.length === 6) break;
      await sleep(30);
    }
  })();
  await waitFor('both inits', () => called.length === 1 && seen.length === 1);
  const second = events.map((e) => ({ ...e, data: { id: e.data.id + 10, n: e.data.id } }));
  await accepted(b.http, second);
  await consumer;
  await waitFor('the callback frames', () => called.length === 6);
  assert.deepEqual(ids(seen, 'create'), [11, 12, 13, 14, 15]);
  assert.deepEqual(ids(called, 'create'), [11, 12, 13, 14, 15]);
  const offsets = called.slice(1).map((m) => m.position.offset);
  assert.deepEqual(offsets, [...offsets].sort((x, y) => x - y));
  await sleep(200);
  assert.equal(called.length, 6, 'nothing more arrives');
});

test('heartbeat pings are answered: the connection outlives several periods', async () => {
  const b = await broker(['--heartbeat-period', '1']);
  const c = client({ url: b.ws });
  const frames = record(c.subscribe('beat'));
  await waitFor('init', () => frames.length === 1);
  await sleep(3500);
  assert.equal(c.state, 'open');
  assert.equal(c.connects, 1, 'the broker did not close the connection for silence');
  await publish(b.http, 'beat', 'create', { id: 1 });
  await waitFor('the event', () => frames.length === 2);
});

test('a broker restart loses nothing and duplicates nothing: every subscription resumes with since', async () => {
  // The redis engine keeps the log (and its epoch) outside the broker, so the restarted
  // broker can replay what was published while the client was away.
  const b = await broker(['--engine', 'redis', '--redis-url', REDIS_URL, '--key-prefix', uniquePrefix('restart'),
    '--shutdown-delay', '0']);
  const states = [];
  // The first reconnect attempt comes 1-2 s after the close: the restart is over by then, and
  // the events published right after it are missed live and must be replayed.
  const c = client({ url: b.ws, reconnect: { initialDelayMs: 2000, maxDelayMs: 4000 } });
  c.onState((s) => states.push(s));
  const all = record(c.subscribe('orders'));
  const even = record(c.subscribe('orders', { query: { filter: { even: { _eq: true } } } }));
  const view = c.view('orders', { filter: { even: { _eq: false } }, sort: ['-id'] });
  await waitFor('the inits', () => all.length === 1 && even.length === 1 && view.frames === 1);

  const item = (id) => ({ id, even: id % 2 === 0 });
  for (let id = 1; id <= 10; id++) await publish(b.http, 'orders', 'create', item(id));
  await waitFor('events 1..10', () => ids(all, 'create').length === 10);

  await control.restart(b.id);
  // The new broker reads the log back from Redis before it takes publishes.
  await waitFor('/readyz 200', async () => (await fetch(`${b.http}/readyz`)).status === 200);
  assert.notEqual(c.state, 'open', 'the client reconnected before the events below were published');
  for (let id = 11; id <= 20; id++) await publish(b.http, 'orders', 'create', item(id));

  await waitFor('events 11..20', () => ids(all, 'create').length >= 20 && ids(even, 'create').length >= 10);
  await sleep(300);
  const range = (n, f = () => true) => [...Array(n).keys()].map((i) => i + 1).filter(f);
  assert.deepEqual(ids(all, 'create'), range(20));
  assert.deepEqual(ids(even, 'create'), range(20, (i) => i % 2 === 0));
  assert.deepEqual(view.items.map((i) => i.id), range(20, (i) => i % 2 === 1).reverse());
  assert.ok(!all.concat(even).some((m) => m.event === 'reset'), 'no resume was lost');
  assert.ok(c.connects >= 2);
  assert.deepEqual(states.slice(0, 2), ['open', 'reconnecting']);
  assert.equal(states.at(-1), 'open');
  // The restarted broker answered three resumes and replayed the missed events from its log.
  assert.equal(await metric(b.http, 'tidings_resumes_total'), 3);
  assert.ok(await metric(b.http, 'tidings_replayed_frames_total') >= 20, 'events 11..20 came as replays');
});

test('an expiring token is renewed by the provider without loss or reconnect', async () => {
  const b = await broker(['--auth-mode', 'handshake', '--jwt-secret', JWT_SECRET, '--jwt-leeway', '0']);
  let minted = 0;
  // Each token is valid for 1-2 s (exp has a resolution of one second).
  const token = () => {
    minted += 1;
    return hs256({ sub: 'js-client', exp: Math.floor(Date.now() / 1000) + 2, tidings: { '*': {} } });
  };
  const errors = [];
  const c = client({ url: b.ws, mode: 'handshake', token });
  c.onError((e) => errors.push(e));
  const frames = record(c.subscribe('ticks'));
  await waitFor('init', () => frames.length === 1);
  // Events keep coming across at least two expiries.
  const started = Date.now();
  let id = 0;
  while (Date.now() - started < 5000) {
    id += 1;
    await publish(b.http, 'ticks', 'create', { id });
    await sleep(40);
  }
  await waitFor(`events 1..${id}`, () => ids(frames, 'create').length >= id);
  await sleep(200);
  assert.deepEqual(ids(frames, 'create'), [...Array(id).keys()].map((i) => i + 1));
  assert.ok(minted >= 3, `the provider was asked ${minted} times`);
  assert.equal(c.connects, 1, 'renewed in band, no reconnect');
  assert.deepEqual(errors, []);
  assert.equal(await metric(b.http, 'tidings_resumes_total'), minted - 1, 'each renewal resumed with since');
});

test('a live view equals the published state after random events', async () => {
  const b = await broker([]);
  const c = client({ url: b.ws });
  const sort = ['-score', 'id'];
  const limit = 7;
  const view = c.view('things', { filter: { group: { _eq: 'a' } }, sort, limit });
  // Every event reaches this one, on the same connection, after the view's frames of it.
  const tracker = c.subscribe('things');
  record(tracker);
  await waitFor('the inits', () => view.frames === 1 && tracker.position !== undefined);

  // A seeded generator, so a failure can be replayed.
  let seed = Number(process.env.TIDINGS_TEST_SEED ?? Date.now() % 1_000_000);
  console.log(`live view seed ${seed}`);
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const pick = (xs) => xs[Math.floor(rand() * xs.length)];
  const model = new Map();
  let nextId = 1;
  let last;
  for (let step = 0; step < 300; step++) {
    const keys = [...model.keys()];
    const r = rand();
    let body;
    if (keys.length < 5 || r < 0.45) {
      const it = { id: nextId++, group: pick(['a', 'b']), score: Math.floor(rand() * 50), title: `t${step}` };
      model.set(it.id, it);
      body = { collection: 'things', event: 'create', data: it };
    } else if (r < 0.8) {
      // An update carries the whole item as it is now (its group never changes).
      const it = { ...model.get(pick(keys)), score: Math.floor(rand() * 50), title: `u${step}` };
      model.set(it.id, it);
      body = { collection: 'things', event: 'update', data: it };
    } else {
      const k = pick(keys);
      const it = model.get(k);
      model.delete(k);
      body = rand() < 0.5
        ? { collection: 'things', event: 'delete', keys: [k] }
        : { collection: 'things', event: 'delete', data: it };
    }
    last = await accepted(b.http, body);
  }
  const expected = [...model.values()]
    .filter((it) => it.group === 'a')
    .sort((x, y) => y.score - x.score || x.id - y.id)
    .slice(0, limit);
  const lastOffset = last.events.at(-1).offset;
  await waitFor(`offset ${lastOffset}`, () => tracker.position?.offset === lastOffset);
  assert.ok(view.frames > 50, `the view saw ${view.frames} frames`);
  assert.deepEqual(view.items, expected);
});

test('a live view of a retained collection starts from the stored items and follows enter and leave', async () => {
  // `--state`: the broker keeps every item, the `init` carries the current list (all of it:
  // the view asks for limit -1, past Directus' default 100), partial updates are merged, and
  // an update that moves an item across the filter arrives as an enter (create) or a leave
  // (key-only delete).
  const b = await broker(['--state', 'kept']);
  let seed = Number(process.env.TIDINGS_TEST_SEED ?? Date.now() % 1_000_000);
  console.log(`retained view seed ${seed}`);
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const model = new Map();
  let nextId = 1;
  let last;
  const send = async (body) => {
    last = await accepted(b.http, body);
  };
  const step = async (createOnly = false) => {
    const keys = [...model.keys()];
    const r = createOnly ? 0 : rand();
    const group = () => (rand() < 0.5 ? 'a' : 'b');
    if (keys.length < 5 || r < 0.3) {
      const it = { id: nextId++, group: group(), score: Math.floor(rand() * 50) };
      model.set(it.id, it);
      await send({ collection: 'kept', event: 'create', data: it });
    } else if (r < 0.85) {
      // A partial update: the group (enter or leave) or the score.
      const id = keys[Math.floor(rand() * keys.length)];
      const patch = rand() < 0.5 ? { id, group: group() } : { id, score: Math.floor(rand() * 50) };
      model.set(id, { ...model.get(id), ...patch });
      await send({ collection: 'kept', event: 'update', data: patch });
    } else {
      const id = keys[Math.floor(rand() * keys.length)];
      model.delete(id);
      await send({ collection: 'kept', event: 'delete', keys: [id] });
    }
  };
  // More than 100 items held before the views open.
  for (let i = 0; i < 260; i++) await step(i < 230);
  assert.ok([...model.values()].filter((it) => it.group === 'a').length > 100, 'enough items for the init');

  const c = client({ url: b.ws });
  const top = c.view('kept', { filter: { group: { _eq: 'a' } }, sort: ['-score', 'id'], limit: 7 });
  const all = c.view('kept', { filter: { group: { _eq: 'a' } }, sort: ['id'] });
  const frames = record(all.subscription);
  const tracker = c.subscribe('kept', { query: { limit: 1 } });
  record(tracker);
  await waitFor('the inits', () => top.frames === 1 && all.frames === 1 && tracker.position !== undefined);
  for (let i = 0; i < 200; i++) await step();

  const lastOffset = last.events.at(-1).offset;
  await waitFor(`offset ${lastOffset}`, () => tracker.position?.offset === lastOffset);
  const inA = [...model.values()].filter((it) => it.group === 'a');
  assert.deepEqual(all.items, [...inA].sort((x, y) => x.id - y.id));
  assert.deepEqual(top.items, [...inA].sort((x, y) => y.score - x.score || x.id - y.id).slice(0, 7));
  const causes = new Set(frames.map((m) => m.cause).filter(Boolean));
  assert.deepEqual([...causes].sort(), ['enter', 'leave'], 'items entered and left the view');
});
