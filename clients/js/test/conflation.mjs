// End to end: the built client (dist/) on a conflating retained collection resumes only from
// the positions the broker marks safe (protocol/README.md §5c).
//
// A small TCP proxy sits between the client and a real `tidings serve`: while it stops
// reading from the broker, the broker's writes to that connection block, its outbox fills
// and the subscription's frames are folded per key (they carry no position). When the proxy
// reads again, the client gets the folded frames and then a checkpoint: its list must equal
// the state and its resume position must be the checkpoint's. A reconnect then resumes from
// it: every later change exactly once, none before it again.
//
// Driven by tests/js_client.rs (`js_client_conflation`), which serves the control API:
//   TIDINGS_TEST_CONTROL    http://127.0.0.1:PORT of the control API
//
// Run: node --experimental-websocket --test test/conflation.mjs (with that variable set).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { connect } from '../dist/index.js';
import { accepted, controlApi, metric, sleep, waitFor } from '../../../tests/support/control.mjs';

const CONTROL = process.env.TIDINGS_TEST_CONTROL;
if (!CONTROL) throw new Error('run through tests/js_client.rs: TIDINGS_TEST_CONTROL must be set');

const control = controlApi(CONTROL);
const clients = [];
const proxies = [];

after(async () => {
  for (const c of clients) c.close();
  for (const p of proxies) p.close();
  await control.stopAll();
});

/**
 * A TCP proxy to `port` on 127.0.0.1 whose broker-to-client direction can be stalled:
 * `stall()` stops reading from the broker (the socket is paused, so the kernel buffers fill
 * and the broker's writes block), `resume()` reads again. `refuse(true)` closes every
 * connection and every new one until `refuse(false)`.
 */
async function stallingProxy(port) {
  const pairs = new Set();
  let stalled = false;
  let refusing = false;
  const server = net.createServer((down) => {
    if (refusing) {
      down.destroy();
      return;
    }
    const up = net.connect(port, '127.0.0.1');
    const pair = { up, down };
    pairs.add(pair);
    // Not `pipe` for this direction: a pipe resumes its source on `drain`, which would undo
    // a stall.
    up.on('data', (chunk) => down.write(chunk));
    down.pipe(up);
    if (stalled) up.pause();
    const end = () => {
      pairs.delete(pair);
      up.destroy();
      down.destroy();
    };
    up.on('close', end);
    down.on('close', end);
    up.on('error', end);
    down.on('error', end);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const proxy = {
    url: `ws://127.0.0.1:${server.address().port}/websocket`,
    connections: () => pairs.size,
    stall() {
      stalled = true;
      for (const { up } of pairs) up.pause();
    },
    resume() {
      stalled = false;
      for (const { up } of pairs) up.resume();
    },
    refuse(on) {
      refusing = on;
      if (on) for (const { up, down } of pairs) up.destroy(), down.destroy();
    },
    close() {
      proxy.refuse(true);
      server.close();
    },
  };
  proxies.push(proxy);
  return proxy;
}

/** Publishes `events` (accepted): the last event's position. */
async function publish(http, events) {
  const last = (await accepted(http, events)).events.at(-1);
  return { epoch: last.epoch, offset: last.offset };
}

const byId = (items) => [...items].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));

test('a stalled conflated subscription resumes from its checkpoint: list equals the state, nothing missed or repeated', async () => {
  const b = await control.broker([
    '--state', 'prices',
    '--slow-consumer-policy', 'conflate',
    // A small soft bound, so folding starts as soon as the kernel buffers are full.
    '--outbox-messages', '64',
    // The stalled connection's write blocks for the whole stall: the write timeout would
    // close it (conflation spares the outbox, not a write that hangs).
    '--write-timeout', '600',
    // No ping the stalled client could not answer in time.
    '--heartbeat-period', '0',
  ]);
  const proxy = await stallingProxy(Number(new URL(b.http).port));
  const COLLECTION = 'prices';
  const blob = 'b'.repeat(8000);
  const model = new Map();
  const change = (event, item) => {
    if (event === 'delete') model.delete(item.id);
    else model.set(item.id, { ...item });
    return event === 'delete'
      ? { collection: COLLECTION, event, keys: [item.id] }
      : { collection: COLLECTION, event, data: item };
  };
  // Few keys: ten hot ones, and padded fillers that fill the buffers.
  const setup = [];
  for (let j = 0; j < 10; j++) setup.push(change('create', { id: `k${j}`, v: -1 }));
  for (let j = 0; j < 20; j++) setup.push(change('create', { id: `f${j}`, v: -1, blob }));
  await publish(b.http, setup);

  const c = connect({ url: proxy.url, reconnect: { initialDelayMs: 20, maxDelayMs: 200 } });
  clients.push(c);
  const view = c.view(COLLECTION);
  const sub = view.subscription;
  const frames = [];
  sub.on((m) => frames.push(m));
  const checkpoints = [];
  sub.onCheckpoint((p) => checkpoints.push(p));
  await waitFor('the init', () => view.frames === 1);
  assert.equal(view.items.length, 30);
  const initPosition = sub.position;
  assert.ok(initPosition, 'init carries a position');

  // Stall; publish padded filler updates until the broker folds this subscription's frames
  // and its write is stuck: two rounds in a row folded and no write completed meanwhile
  // (this is the only connection, so `tidings_deliveries_total` counts its writes; two, so
  // that a write merely slow on a loaded machine is not taken for a stuck one). Folding
  // alone is not enough: a write that still completes lets the broker drain the folded
  // frames (with a checkpoint) and send later ones unfolded.
  proxy.stall();
  let fillers = 0;
  let written = await metric(b.http, 'tidings_deliveries_total');
  for (let round = 0, stuck = 0; stuck < 2; round++) {
    assert.ok(round < 200, 'the stalled subscription never folded with its write stuck');
    const folded = await metric(b.http, 'tidings_conflated_total');
    const batch = [];
    for (let i = 0; i < 100; i++, fillers++) batch.push(change('update', { id: `f${fillers % 20}`, v: fillers, blob }));
    await publish(b.http, batch);
    await sleep(300);
    const nowWritten = await metric(b.http, 'tidings_deliveries_total');
    const folding = (await metric(b.http, 'tidings_conflated_total')) > folded;
    stuck = nowWritten === written && folding ? stuck + 1 : 0;
    written = nowWritten;
  }
  // Then many changes to few keys, with the merge rules that drop or keep a delete.
  const phase = [];
  for (let i = 0; i < 5000; i++) phase.push(change('update', { id: `k${i % 10}`, v: i }));
  phase.push(change('delete', { id: 'k0' })); // update + delete → delete
  phase.push(change('delete', { id: 'k1' }), change('create', { id: 'k1', v: 'again' })); // delete + create → update
  phase.push(change('create', { id: 'n0', v: 0 }), change('delete', { id: 'n0' })); // create + delete → nothing
  let last;
  for (let i = 0; i < phase.length; i += 1000) last = await publish(b.http, phase.slice(i, i + 1000));
  assert.equal(await metric(b.http, 'tidings_deliveries_total'), written, 'the write stayed stuck through the changes');
  const framesBefore = frames.length;
  console.log(`stalled after ${fillers} filler updates (write stuck); ${phase.length} more changes up to offset ${last.offset}`);

  // Read again: the folded frames, then (in the same write) a checkpoint at the last event.
  proxy.resume();
  const expected = byId(model.values());
  await waitFor('the list to equal the state', () => JSON.stringify(byId(view.items)) === JSON.stringify(expected), 60_000);
  await waitFor(`the position to reach offset ${last.offset}`, () => sub.position?.offset === last.offset, 5_000).catch(
    () => assert.fail(`the resume position is ${JSON.stringify(sub.position)}, not the checkpoint's ${JSON.stringify(last)}`),
  );
  const afterStall = frames.slice(framesBefore);
  const folded = afterStall.filter((m) => m.position === undefined);
  console.log(`after the stall: ${afterStall.length} frames (${folded.length} folded), ${checkpoints.length} checkpoint(s)`);
  assert.ok(folded.length > 0, 'some frames arrived folded (without a position)');
  assert.ok(afterStall.length < fillers + phase.length, 'fewer frames than events: they were merged');
  assert.ok(frames.every((m) => m.event !== 'checkpoint'), 'a checkpoint is never a data frame');
  assert.deepEqual(byId(view.items), byId(model.values()), 'the list equals the state');
  assert.deepEqual(sub.position, last, 'the resume position is the checkpoint');
  assert.deepEqual(checkpoints.at(-1), last);

  // The state as a fresh subscriber sees it, directly.
  const direct = connect({ url: b.ws });
  clients.push(direct);
  const fresh = direct.view(COLLECTION);
  await waitFor('the fresh init', () => fresh.frames === 1);
  assert.deepEqual(byId(view.items), byId(fresh.items), 'the list equals the broker\'s state');
  direct.close();

  // Disconnect; changes happen meanwhile; the reconnect resumes from the checkpoint.
  const connects = c.connects;
  proxy.refuse(true);
  await waitFor('the disconnect', () => c.state === 'reconnecting');
  const missed = [];
  for (let i = 0; i < 20; i++) missed.push(change('update', { id: `k${2 + (i % 8)}`, v: `late${i}` }));
  const end = await publish(b.http, missed);
  const framesBeforeResume = frames.length;
  proxy.refuse(false);
  await waitFor(`the resume up to offset ${end.offset}`, () => sub.position?.offset === end.offset, 30_000);
  assert.ok(c.connects > connects, 'it reconnected');
  const replayed = frames.slice(framesBeforeResume);
  assert.deepEqual(
    replayed.map((m) => m.position?.offset),
    missed.map((_, i) => last.offset + 1 + i),
    'every change after the checkpoint exactly once, none before it',
  );
  assert.deepEqual(replayed.map((m) => m.event), missed.map(() => 'update'), 'no reset: the resume was recovered');
  assert.deepEqual(replayed.map((m) => m.data), missed.map((e) => [e.data]));
  assert.deepEqual(byId(view.items), byId(model.values()), 'the list still equals the state');
});
