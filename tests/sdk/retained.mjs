// The official Directus client (`@directus/sdk` `realtime()`) on a retained collection
// (`--state orders`): a non-empty `init`, then an enter, a leave and a partial update, with the
// list the application keeps from the frames applied as a Directus client applies them
// (init = the list, create = add, update = replace, delete = remove). At the end that list
// must equal what the broker reads from its state, over HTTP (`GET …/items`) and over the
// socket (an `items` read sent with the SDK's `sendMessage`). Driven by `tests/directus_sdk.rs`
// (handshake mode, static token `admin-static-token`).
//
//   node tests/sdk/retained.mjs http://127.0.0.1:PORT
//
// stdout `SDK RETAINED OK <n> checks` + exit 0 on success; `FAIL: <reason>` + exit 1.
// One subscription, and every publish waits for the frame of the one before: the SDK drops
// frames that share a socket read (see conformance.mjs, "Frame loss").

import assert from 'node:assert/strict';
import { createDirectus, realtime, staticToken } from '@directus/sdk';
import WebSocket from 'ws';

const BASE = (process.argv[2] || '').replace(/\/+$/, '');
const TOKEN = 'admin-static-token';
const COLLECTION = 'orders';
const FRAME_WAIT_MS = 5000;
const WATCHDOG_MS = 30000;
const QUERY = { fields: ['id', 'title', 'status'], filter: { status: { _eq: 'open' } }, meta: '*' };

const received = []; // every frame of the SDK's socket, parsed
let checks = 0;

function fail(reason) {
  const text = reason instanceof Error ? reason.stack || reason.message : String(reason);
  process.stdout.write(`FAIL: ${text}\n`);
  for (const f of received) process.stdout.write(`  < ${JSON.stringify(f)}\n`);
  process.exit(1);
}
process.on('uncaughtException', (e) => fail(`uncaught exception: ${e && (e.stack || e)}`));
process.on('unhandledRejection', (e) => fail(`unhandled rejection: ${e && (e.stack || JSON.stringify(e))}`));
setTimeout(() => fail(`watchdog: the run took more than ${WATCHDOG_MS} ms`), WATCHDOG_MS);
if (!/^https?:\/\//.test(BASE)) fail('usage: node retained.mjs http://127.0.0.1:PORT');

class LoggingWebSocket extends WebSocket {
  constructor(url, ...rest) {
    super(url, ...rest);
    this.on('message', (data) => received.push(JSON.parse(data.toString())));
  }
}

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

async function publish(body) {
  const res = await fetch(`${BASE}/v1/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ collection: COLLECTION, ...body }),
  });
  const text = await res.text();
  check(`publish ${JSON.stringify(body)}`, () => assert.equal(res.status, 202, text));
}

// The next frame the subscription's generator yields (the generator is pulled continuously).
function pump(sub) {
  const q = { frames: [], waiters: [] };
  (async () => {
    for await (const frame of sub.subscription) {
      q.frames.push(frame);
      q.waiters.splice(0).forEach((w) => w());
    }
  })().catch(fail);
  return q;
}

async function next(q, what) {
  const deadline = Date.now() + FRAME_WAIT_MS;
  while (q.frames.length === 0) {
    if (Date.now() > deadline) throw new Error(`no frame within ${FRAME_WAIT_MS} ms: ${what}`);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, 50);
      q.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
  const { position, ...frame } = q.frames.shift();
  check(`${what}: position`, () => assert.ok(Number.isInteger(position.offset)));
  return frame;
}

// Applies one frame to the list as a Directus client does.
function apply(list, frame) {
  switch (frame.event) {
    case 'init':
      list.clear();
      for (const item of frame.data) list.set(item.id, item);
      break;
    case 'create':
    case 'update':
      for (const item of frame.data) list.set(item.id, item);
      break;
    case 'delete':
      for (const key of frame.data) list.delete(Number(key));
      break;
    default:
      throw new Error(`unexpected frame ${JSON.stringify(frame)}`);
  }
}

const sorted = (list) => [...list.values()].sort((a, b) => a.id - b.id);

async function main() {
  await publish({
    event: 'create',
    data: [
      { id: 1, title: 'a', status: 'open', secret: 's1' },
      { id: 2, title: 'b', status: 'done', secret: 's2' },
      { id: 3, title: 'c', status: 'open', secret: 's3' },
    ],
  });
  const client = createDirectus(BASE, { globals: { WebSocket: LoggingWebSocket } })
    .with(staticToken(TOKEN))
    .with(realtime({ authMode: 'handshake' }));
  await client.connect();
  const q = pump(await client.subscribe(COLLECTION, { query: QUERY }));
  const list = new Map();

  const init = await next(q, 'init');
  check('a non-empty init from the state, with meta', () =>
    assert.deepStrictEqual(init, {
      type: 'subscription',
      event: 'init',
      data: [
        { id: 1, title: 'a', status: 'open' },
        { id: 3, title: 'c', status: 'open' },
      ],
      meta: { total_count: 3, filter_count: 2 },
      uid: '1',
    }),
  );
  apply(list, init);

  // Enter: a partial update of a done order that makes it open.
  await publish({ event: 'update', data: { id: 2, status: 'open' } });
  const enter = await next(q, 'enter');
  check('enter arrives as a create of the full item', () =>
    assert.deepStrictEqual(enter, {
      type: 'subscription',
      event: 'create',
      data: [{ id: 2, title: 'b', status: 'open' }],
      uid: '1',
      cause: 'enter',
    }),
  );
  apply(list, enter);

  // Leave: an open order is closed; the client gets its key only.
  await publish({ event: 'update', data: { id: 1, status: 'done', title: 'a (closed)' } });
  const leave = await next(q, 'leave');
  check('leave arrives as a delete of the key only', () =>
    assert.deepStrictEqual(leave, { type: 'subscription', event: 'delete', data: [1], uid: '1', cause: 'leave' }),
  );
  apply(list, leave);

  // A partial update of an item still shown: the full merged item.
  await publish({ event: 'update', data: { id: 3, title: 'c2' } });
  const update = await next(q, 'update');
  check('a partial update arrives merged', () =>
    assert.deepStrictEqual(update, {
      type: 'subscription',
      event: 'update',
      data: [{ id: 3, title: 'c2', status: 'open' }],
      uid: '1',
    }),
  );
  apply(list, update);

  const expected = [
    { id: 2, title: 'b', status: 'open' },
    { id: 3, title: 'c2', status: 'open' },
  ];
  check('the list kept from the frames', () => assert.deepStrictEqual(sorted(list), expected));

  // The broker's own read of its state, over HTTP, with the same query.
  const params = new URLSearchParams({
    fields: QUERY.fields.join(','),
    filter: JSON.stringify(QUERY.filter),
    meta: '*',
  });
  const res = await fetch(`${BASE}/v1/collections/${COLLECTION}/items?${params}`, {
    headers: { authorization: `Bearer ${TOKEN}` },
  });
  const body = await res.json();
  check('GET …/items equals the list', () => {
    assert.equal(res.status, 200, JSON.stringify(body));
    assert.deepStrictEqual(body, { data: expected, meta: { total_count: 3, filter_count: 2 } });
  });

  // And over the socket, with the SDK's sendMessage (it has no items helper for realtime).
  client.sendMessage({ type: 'items', collection: COLLECTION, action: 'read', query: QUERY, uid: 'read-1' });
  const deadline = Date.now() + FRAME_WAIT_MS;
  let reply;
  while (!(reply = received.find((f) => f.type === 'items' && f.uid === 'read-1'))) {
    if (Date.now() > deadline) throw new Error('no items reply');
    await sleep(10);
  }
  check('the socket items read equals the list', () =>
    assert.deepStrictEqual(reply, {
      type: 'items',
      data: expected,
      meta: { total_count: 3, filter_count: 2 },
      uid: 'read-1',
    }),
  );

  client.disconnect();
  process.stdout.write(`SDK RETAINED OK ${checks} checks\n`);
  process.exit(0);
}

main().catch(fail);
