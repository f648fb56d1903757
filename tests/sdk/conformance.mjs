// Conformance run of the official Directus client (`@directus/sdk` `realtime()`) against a
// Tidings broker. Driven by `tests/directus_sdk.rs`, which starts the broker (handshake mode,
// static token `admin-static-token`) and restarts it on request.
//
//   node tests/sdk/conformance.mjs http://127.0.0.1:PORT      (or TIDINGS_HTTP=http://...)
//
// Protocol with the driver:
//   stdout `READY_FOR_RESTART`        the driver shuts the broker down (sessions get close 1001),
//                                     binds a new broker to the same address, then writes
//   stdin  `RESTARTED`                and the SDK must reconnect on its own.
//   stdout `SDK CONFORMANCE OK <n> checks` + exit 0 on success; `FAIL: <reason>` + exit 1.
//
// Things about the SDK (26.0.0) that shape this script (reference §3):
// - Frame loss: every subscription generator (and the SDK's internal handler) listens with a
//   one-shot `message` listener that it removes after each frame and re-attaches only after the
//   consumer pulled the frame (microtasks later). `ws` dispatches all frames of one socket read
//   synchronously, so when several frames arrive in one read only the first reaches each
//   generator and the rest are silently dropped. Hence: (1) each subscription is drained by a
//   pump that is always waiting on the generator, (2) every publish is made only after the frame
//   expected from the previous one has been yielded, (3) every publish matches at most one
//   subscription of the connection (two matching subscriptions = two frames in one read).
// - Nothing is buffered while no one pulls a generator, so the pumps start right after subscribe.
// - Node 20 has no stable global WebSocket: the `ws` package is passed via `globals.WebSocket`.
//   (With Node's built-in WebSocket a refused connection makes the SDK recurse — `close()` in
//   its `error` handler — until the stack overflows; `ws` does not, and the watchdog and the
//   uncaught-exception guard below turn any such hang or crash into a clean failure.)
// - A raw log of every frame each socket received is kept (a persistent listener installed by a
//   WebSocket subclass), so "this frame never arrived" is checked on the wire, not only through
//   the lossy generators.

import assert from 'node:assert/strict';
import { createInterface } from 'node:readline';
import { createDirectus, realtime, staticToken } from '@directus/sdk';
import WebSocket from 'ws';

const BASE = (process.argv[2] || process.env.TIDINGS_HTTP || '').replace(/\/+$/, '');
const TOKEN = 'admin-static-token';
const COLLECTION = 'messages';
const FRAME_WAIT_MS = 5000; // one expected frame
const QUIET_MS = 300; // how long "nothing more arrives" is watched
const RESTART_WAIT_MS = 30000; // driver restarting the broker
const RECONNECT_WAIT_MS = 15000; // SDK reconnecting (1 s delay, handshake, resubscribe)
const WATCHDOG_MS = 60000;

function fail(reason) {
  const text = reason instanceof Error ? (reason.stack || reason.message) : String(reason);
  process.stdout.write(`FAIL: ${text}\n`);
  dumpRawLog();
  process.exit(1);
}

process.on('uncaughtException', (e) => fail(`uncaught exception: ${e && (e.stack || e)}`));
process.on('unhandledRejection', (e) => fail(`unhandled rejection: ${e && (e.stack || JSON.stringify(e))}`));
setTimeout(() => fail(`watchdog: the whole run took more than ${WATCHDOG_MS} ms`), WATCHDOG_MS);

if (!/^https?:\/\//.test(BASE)) {
  fail('usage: node conformance.mjs http://127.0.0.1:PORT (or set TIDINGS_HTTP)');
}

const log = (...a) => process.stderr.write(`[sdk] ${a.join(' ')}\n`);

// ---------------------------------------------------------------------------------------------
// Raw wire log: one entry per WebSocket the SDK opens.

const connections = []; // { id, url, sent: [obj], received: [obj], close: {code, reason} | null }

class LoggingWebSocket extends WebSocket {
  constructor(url, ...rest) {
    super(url, ...rest);
    const conn = { id: connections.length + 1, url: String(url), sent: [], received: [], close: null };
    connections.push(conn);
    this.conn = conn;
    this.on('message', (data, isBinary) => {
      const text = data.toString();
      let value;
      try {
        value = JSON.parse(text);
      } catch {
        value = { __non_json__: text, isBinary };
      }
      conn.received.push(value);
    });
    this.on('close', (code, reason) => {
      conn.close = { code, reason: reason.toString() };
    });
    this.on('error', (e) => log(`socket #${conn.id} error: ${e.message}`));
  }

  send(data, ...rest) {
    const conn = this.conn;
    try {
      conn.sent.push(JSON.parse(String(data)));
    } catch {
      conn.sent.push({ __non_json__: String(data) });
    }
    return super.send(data, ...rest);
  }
}

function dumpRawLog() {
  for (const c of connections) {
    process.stdout.write(`--- socket #${c.id} ${c.url} close=${JSON.stringify(c.close)}\n`);
    for (const f of c.sent) process.stdout.write(`  > ${JSON.stringify(f)}\n`);
    for (const f of c.received) process.stdout.write(`  < ${JSON.stringify(f)}\n`);
  }
}

// Received frames without heartbeats (30 s period, not expected in a run, but harmless).
const wire = (conn) => conn.received.filter((f) => f.type !== 'ping').map(withoutPosition);

// ---------------------------------------------------------------------------------------------
// Small helpers.

let checks = 0;
function check(what, fn) {
  try {
    fn();
  } catch (e) {
    e.message = `${what}: ${e.message}`;
    throw e;
  }
  checks += 1;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function waitUntil(cond, ms, what) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() >= deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

async function publish(body) {
  const res = await withTimeout(
    fetch(`${BASE}/v1/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    }),
    FRAME_WAIT_MS,
    `POST /v1/publish ${JSON.stringify(body)}`,
  );
  const text = await res.text();
  check(`publish ${JSON.stringify(body)} accepted`, () =>
    assert.equal(res.status, 202, `HTTP ${res.status}: ${text}`),
  );
}

// Drains a subscription generator continuously into a queue (see "Frame loss" above).
function pump(name, sub) {
  const q = { name, frames: [], waiters: [], done: false, error: null, unsubscribe: sub.unsubscribe };
  const wake = () => q.waiters.splice(0).forEach((w) => w());
  (async () => {
    try {
      for await (const frame of sub.subscription) {
        log(`${name} yielded ${JSON.stringify(frame)}`);
        q.frames.push(frame);
        wake();
      }
    } catch (e) {
      q.error = e;
      log(`${name} threw ${JSON.stringify(e)}`);
    }
    q.done = true;
    wake();
  })();
  return q;
}

// The next frame the generator yields, within `ms`.
async function nextFrame(q, what, ms = FRAME_WAIT_MS) {
  const deadline = Date.now() + ms;
  while (q.frames.length === 0) {
    if (q.error) throw new Error(`${q.name}: generator threw ${JSON.stringify(q.error)} while waiting for ${what}`);
    if (q.done) throw new Error(`${q.name}: generator ended while waiting for ${what}`);
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`${q.name}: no frame within ${ms} ms while waiting for ${what}`);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, left);
      q.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
  return q.frames.shift();
}

// Tidings adds `position` to every init and event frame (a protocol extension the SDK passes
// through untouched). Check its shape, then compare the rest with what Directus sends.
function withoutPosition(frame) {
  if (!frame || typeof frame !== 'object' || !('position' in frame)) return frame;
  const { position, ...rest } = frame;
  assert.equal(typeof position.epoch, 'string');
  assert.ok(Number.isInteger(position.offset) && position.offset >= 0);
  return rest;
}

async function expectFrame(q, expected, what, ms = FRAME_WAIT_MS) {
  const got = await nextFrame(q, what, ms);
  check(`${q.name}: ${what}`, () => assert.deepStrictEqual(withoutPosition(got), expected));
  return got;
}

async function expectNothingMore(q, what) {
  await sleep(QUIET_MS);
  check(`${q.name}: ${what}`, () => assert.deepStrictEqual(q.frames, [], 'unexpected frame(s)'));
}

// stdin lines from the driver.
const stdinLines = [];
const stdinWaiters = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  stdinLines.push(line.trim());
  stdinWaiters.splice(0).forEach((w) => w());
});
async function waitForLine(prefix, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    const i = stdinLines.findIndex((l) => l.startsWith(prefix));
    if (i >= 0) return stdinLines.splice(i, 1)[0];
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`no \`${prefix}\` line on stdin within ${ms} ms`);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, left);
      stdinWaiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  log(`broker ${BASE}`);
  const client = createDirectus(BASE, { globals: { WebSocket: LoggingWebSocket } })
    .with(staticToken(TOKEN))
    .with(realtime({ authMode: 'handshake' }));

  // connect(): the SDK sends `auth` and rejects unless the very next frame, within 1 s, is
  // {"type":"auth","status":"ok"}.
  await withTimeout(client.connect(), FRAME_WAIT_MS, 'connect() with the auth handshake');
  const c1 = connections[0];
  check('websocket URL is the base URL with path /websocket', () =>
    assert.equal(c1.url, `${BASE.replace(/^http/, 'ws')}/websocket`),
  );
  check('SDK sent the access_token auth first', () =>
    assert.deepStrictEqual(c1.sent[0], { access_token: TOKEN, type: 'auth' }),
  );
  check('first frame is auth ok', () => assert.deepStrictEqual(c1.received[0], { type: 'auth', status: 'ok' }));

  // Subscription 1: every event, filtered and projected (the SDK sends the H26 string form:
  // "fields":"id,text,status","filter":"{\"status\":{\"_eq\":\"published\"}}").
  const s1 = pump(
    's1',
    await client.subscribe(COLLECTION, {
      query: { fields: ['id', 'text', 'status'], filter: { status: { _eq: 'published' } } },
    }),
  );
  check('subscribe 1 went out in the string query form', () =>
    assert.deepStrictEqual(c1.sent.at(-1), {
      query: { fields: 'id,text,status', filter: '{"status":{"_eq":"published"}}' },
      uid: '1',
      collection: COLLECTION,
      type: 'subscribe',
    }),
  );
  await expectFrame(s1, { type: 'subscription', event: 'init', data: [], uid: '1' }, 'init with data []');

  // Subscription 2: creates only, other projection, `_in` filter.
  const s2 = pump(
    's2',
    await client.subscribe(COLLECTION, {
      event: 'create',
      query: { fields: ['id', 'user'], filter: { user: { _in: ['carol', 'dave'] } } },
    }),
  );
  check('subscribe 2 went out in the string query form', () =>
    assert.deepStrictEqual(c1.sent.at(-1), {
      event: 'create',
      query: { fields: 'id,user', filter: '{"user":{"_in":["carol","dave"]}}' },
      uid: '2',
      collection: COLLECTION,
      type: 'subscribe',
    }),
  );
  await expectFrame(s2, { type: 'subscription', event: 'init', uid: '2' }, 'init without data (event subscription)');

  // Every publish below matches at most one subscription, and the next publish waits for the
  // frame the previous one should produce (the SDK drops frames that share a socket read).

  // An item matching neither subscription, immediately followed by one matching s1 only: the
  // next frame s1 yields must be the second one (per-subscription order = publish order).
  await publish({
    collection: COLLECTION,
    event: 'create',
    data: { id: 1, text: 'draft by bob', status: 'draft', user: 'bob' },
  });
  await publish({
    collection: COLLECTION,
    event: 'create',
    data: [{ id: 2, text: 'hello', status: 'published', user: 'erin' }],
  });
  await expectFrame(
    s1,
    { type: 'subscription', event: 'create', data: [{ id: 2, text: 'hello', status: 'published' }], uid: '1' },
    'create with only the requested fields, non-matching item skipped',
  );

  // Matches s2 only (draft): projected to id,user.
  await publish({
    collection: COLLECTION,
    event: 'create',
    data: [{ id: 3, text: 'from carol', status: 'draft', user: 'carol' }],
  });
  await expectFrame(
    s2,
    { type: 'subscription', event: 'create', data: [{ id: 3, user: 'carol' }], uid: '2' },
    'create with only id,user',
  );

  // Update: s1 only (s2 is create-only).
  await publish({
    collection: COLLECTION,
    event: 'update',
    data: [{ id: 2, text: 'hello edited', status: 'published', user: 'erin' }],
  });
  await expectFrame(
    s1,
    { type: 'subscription', event: 'update', data: [{ id: 2, text: 'hello edited', status: 'published' }], uid: '1' },
    'update',
  );

  // Delete with the deleted items: goes through the filter; the frame carries the keys as given.
  // First a delete of a non-matching item (nothing), then one of a matching item.
  await publish({
    collection: COLLECTION,
    event: 'delete',
    data: [{ id: 1, text: 'draft by bob', status: 'draft', user: 'bob' }],
  });
  await publish({
    collection: COLLECTION,
    event: 'delete',
    data: [{ id: 2, text: 'hello edited', status: 'published', user: 'erin' }],
  });
  await expectFrame(s1, { type: 'subscription', event: 'delete', data: [2], uid: '1' }, 'delete (with data) as keys array');

  // Key-only delete: reaches every subscription of the collection (s2 is create-only).
  await publish({ collection: COLLECTION, event: 'delete', keys: ['3'] });
  await expectFrame(s1, { type: 'subscription', event: 'delete', data: ['3'], uid: '1' }, 'key-only delete as keys array');

  // Unsubscribe s1 right away: its generator yields the ack, then ends. (Right away because the
  // generator's listener re-arms every 1 s and stops listening once unsubscribe() was called: an
  // ack landing just after such a re-arm would be missed. "Nothing else arrived" is checked on
  // the wire below.)
  s1.unsubscribe();
  check('unsubscribe frame', () => assert.deepStrictEqual(c1.sent.at(-1), { uid: '1', type: 'unsubscribe' }));
  await expectFrame(s1, { type: 'subscription', event: 'unsubscribe', uid: '1' }, 'unsubscribe ack');
  await waitUntil(() => s1.done, FRAME_WAIT_MS, 's1 generator to end after its unsubscribe ack');
  check('s1 generator ended cleanly after the ack', () => {
    assert.equal(s1.error, null);
    assert.deepStrictEqual(s1.frames, []);
  });
  await expectNothingMore(s2, 'nothing else for s2');

  // Matches both filters, but s1 is gone: only s2 gets it, and nothing for uid 1 on the wire.
  await publish({
    collection: COLLECTION,
    event: 'create',
    data: [{ id: 4, text: 'from dave', status: 'published', user: 'dave' }],
  });
  await expectFrame(
    s2,
    { type: 'subscription', event: 'create', data: [{ id: 4, user: 'dave' }], uid: '2' },
    'create after the other subscription was removed',
  );
  await expectNothingMore(s2, 'nothing else for s2 after unsubscribe');

  // The whole first connection, on the wire (not through the lossy generators).
  check('socket #1: exact frame sequence', () =>
    assert.deepStrictEqual(wire(c1), [
      { type: 'auth', status: 'ok' },
      { type: 'subscription', event: 'init', data: [], uid: '1' },
      { type: 'subscription', event: 'init', uid: '2' },
      { type: 'subscription', event: 'create', data: [{ id: 2, text: 'hello', status: 'published' }], uid: '1' },
      { type: 'subscription', event: 'create', data: [{ id: 3, user: 'carol' }], uid: '2' },
      { type: 'subscription', event: 'update', data: [{ id: 2, text: 'hello edited', status: 'published' }], uid: '1' },
      { type: 'subscription', event: 'delete', data: [2], uid: '1' },
      { type: 'subscription', event: 'delete', data: ['3'], uid: '1' },
      { type: 'subscription', event: 'unsubscribe', uid: '1' },
      { type: 'subscription', event: 'create', data: [{ id: 4, user: 'dave' }], uid: '2' },
    ]),
  );

  // --- Reconnect / resubscribe -------------------------------------------------------------
  // Only s2 is active, so the re-sent subscribe frames concern one generator (several inits
  // in one socket read would otherwise starve a second generator, see "Frame loss").
  process.stdout.write('READY_FOR_RESTART\n');
  await waitForLine('RESTARTED', RESTART_WAIT_MS);
  // The driver's shutdown may return before node processed the close frame.
  await waitUntil(() => c1.close, FRAME_WAIT_MS, 'socket #1 to be closed by the broker').catch(() => {});
  check('socket #1 was closed by the broker with 1001', () => {
    assert.ok(c1.close, 'socket #1 not closed');
    assert.equal(c1.close.code, 1001);
  });

  // The SDK reconnects (1 s later), redoes the handshake and re-sends the remembered subscribe
  // (once from its reconnect routine, once more from the generator that was waiting), so one
  // or two inits for uid 2 arrive; at least one must reach the generator.
  await expectFrame(
    s2,
    { type: 'subscription', event: 'init', uid: '2' },
    'init again after the SDK reconnected and resubscribed',
    RECONNECT_WAIT_MS,
  );
  // Let a second init (from the generator's own re-send) land.
  await waitUntil(
    () => connections.length === 2 && wire(connections[1]).length - 1 >= connections[1].sent.length - 1,
    FRAME_WAIT_MS,
    'one init per re-sent subscribe on socket #2',
  ).catch(() => {});
  await sleep(QUIET_MS);
  s2.frames = s2.frames.filter((f) => !(f.event === 'init' && f.uid === '2'));
  check('s2 yielded nothing but inits since the reconnect', () => assert.deepStrictEqual(s2.frames, []));

  check('exactly one new socket', () => assert.equal(connections.length, 2));
  const c2 = connections[1];
  check('socket #2: handshake again', () => {
    assert.deepStrictEqual(c2.sent[0], { access_token: TOKEN, type: 'auth' });
    assert.deepStrictEqual(c2.received[0], { type: 'auth', status: 'ok' });
  });
  const resubscribes = c2.sent.slice(1);
  check('socket #2: the remembered subscribe re-sent unchanged (same uid)', () => {
    assert.ok(resubscribes.length >= 1, 'no subscribe re-sent');
    for (const f of resubscribes) {
      assert.deepStrictEqual(f, {
        event: 'create',
        query: { fields: 'id,user', filter: '{"user":{"_in":["carol","dave"]}}' },
        uid: '2',
        collection: COLLECTION,
        type: 'subscribe',
      });
    }
  });
  check('socket #2: one init per subscribe', () =>
    assert.deepStrictEqual(
      wire(c2).slice(1),
      resubscribes.map(() => ({ type: 'subscription', event: 'init', uid: '2' })),
    ),
  );

  // A publish after the restart reaches the resubscribed generator.
  await publish({
    collection: COLLECTION,
    event: 'create',
    data: [{ id: 5, text: 'after restart', status: 'draft', user: 'carol' }],
  });
  await expectFrame(
    s2,
    { type: 'subscription', event: 'create', data: [{ id: 5, user: 'carol' }], uid: '2' },
    'create after the restart',
  );
  await expectNothingMore(s2, 'nothing else after the restart');
  check('socket #2: exactly one create frame on the wire', () =>
    assert.deepStrictEqual(
      wire(c2).filter((f) => f.event !== 'init'),
      [
        { type: 'auth', status: 'ok' },
        { type: 'subscription', event: 'create', data: [{ id: 5, user: 'carol' }], uid: '2' },
      ],
    ),
  );

  client.disconnect();
  process.stdout.write(`SDK CONFORMANCE OK ${checks} checks\n`);
  process.exit(0);
}

main().catch(fail);
