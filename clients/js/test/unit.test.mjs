// Unit tests of the client against a scripted fake WebSocket (no network).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, applyFrame, backoffDelay, positionInReason } from '../dist/index.js';

class FakeWS {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(d) { this.sent.push(JSON.parse(d)); }
  close() { this.readyState = 3; this.onclose?.({ code: 1000, reason: '' }); }
  // Several frames handed over in one go, as one socket read would.
  push(...frames) { for (const f of frames) this.onmessage?.({ data: JSON.stringify(f) }); }
  drop(reason = 'shutdown') { this.readyState = 3; this.onclose?.({ code: 1001, reason }); }
}
const tick = () => new Promise((r) => setTimeout(r, 5));
const last = () => FakeWS.all[FakeWS.all.length - 1];
const pos = (offset) => ({ epoch: 'e1', offset });

test('backoff grows, is capped, and is jittered within [base/2, base]', () => {
  const o = { initialDelayMs: 100, maxDelayMs: 1000 };
  assert.equal(backoffDelay(0, o, () => 0), 50);
  assert.equal(backoffDelay(0, o, () => 0.999), 100);
  assert.equal(backoffDelay(3, o, () => 0.999), 800);
  assert.equal(backoffDelay(20, o, () => 0.999), 1000);
  assert.equal(backoffDelay(20, o, () => 0), 500);
});

test('applyFrame handles init, create, update merge, delete, enter and leave', () => {
  const m = new Map();
  applyFrame(m, { event: 'init', data: [{ id: 1, a: 1 }] }, 'id');
  applyFrame(m, { event: 'create', data: [{ id: 2, a: 2 }] }, 'id');
  applyFrame(m, { event: 'update', data: [{ id: 1, b: 3 }] }, 'id');
  assert.deepEqual(m.get('1'), { id: 1, a: 1, b: 3 });
  applyFrame(m, { event: 'delete', data: ['2'] }, 'id');
  assert.equal(m.has('2'), false);
  applyFrame(m, { event: 'create', cause: 'enter', data: [{ id: 5 }] }, 'id');
  applyFrame(m, { event: 'delete', cause: 'leave', data: [1] }, 'id');
  assert.deepEqual([...m.keys()], ['5']);
  applyFrame(m, { event: 'reset', data: [{ id: 9 }] }, 'id');
  assert.deepEqual([...m.keys()], ['9']);
});

test('five frames arriving at once are all yielded, heartbeat answered', async () => {
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS });
  const sub = c.subscribe('orders');
  await tick();
  const ws = last();
  const uid = ws.sent.find((m) => m.type === 'subscribe').uid;
  ws.push({ type: 'ping' });
  assert.deepEqual(ws.sent.at(-1), { type: 'pong' });
  ws.push(
    { type: 'subscription', event: 'init', data: [], uid, position: pos(0) },
    ...[1, 2, 3, 4, 5].map((i) => ({ type: 'subscription', event: 'create', data: [{ id: i }], uid, position: pos(i) })),
  );
  const seen = [];
  for await (const m of sub) {
    seen.push(m);
    if (seen.length === 6) break;
  }
  assert.deepEqual(seen.map((m) => m.event), ['init', 'create', 'create', 'create', 'create', 'create']);
  c.close();
});

test('reconnect resumes with since; recovered:false is a reset; states are visible', async () => {
  const states = [];
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS, reconnect: { initialDelayMs: 1 }, random: () => 0 });
  c.onState((s) => states.push(s));
  const sub = c.subscribe('orders', { query: { filter: { a: { _eq: 1 } } } });
  const got = [];
  sub.on((m) => got.push(m));
  await tick();
  let ws = last();
  let uid = ws.sent[0].uid;
  ws.push({ type: 'subscription', event: 'init', data: [], uid, position: pos(3) },
          { type: 'subscription', event: 'create', data: [{ id: 1 }], uid, position: pos(4) });
  ws.drop();
  await tick(); await tick();
  ws = last();
  const again = ws.sent.find((m) => m.type === 'subscribe');
  assert.deepEqual(again.since, pos(4));
  assert.deepEqual(again.query, { filter: { a: { _eq: 1 } } });
  uid = again.uid;
  ws.push({ type: 'subscription', event: 'init', data: [], uid, position: pos(6), recovered: true },
          { type: 'subscription', event: 'create', data: [{ id: 2 }], uid, position: pos(5) });
  ws.drop();
  await tick(); await tick();
  ws = last();
  uid = ws.sent.find((m) => m.type === 'subscribe').uid;
  ws.push({ type: 'subscription', event: 'init', data: [{ id: 7 }], uid, position: { epoch: 'e2', offset: 0 }, recovered: false });
  assert.deepEqual(got.map((m) => m.event), ['init', 'create', 'create', 'reset']);
  assert.deepEqual(states, ['open', 'reconnecting', 'open', 'reconnecting', 'open']);
  c.close();
  assert.equal(c.state, 'closed');
});

test('handshake auth, TOKEN_EXPIRED asks the provider and resubscribes with since', async () => {
  let n = 0;
  const c = new Client({ url: 'http://x', mode: 'handshake', token: () => `tok${++n}`, WebSocket: FakeWS });
  const sub = c.subscribe('orders');
  const got = [];
  sub.on((m) => got.push(m));
  await tick();
  const ws = last();
  assert.equal(ws.url, 'ws://x/websocket');
  assert.deepEqual(ws.sent, [{ type: 'auth', access_token: 'tok1' }]);
  ws.push({ type: 'auth', status: 'ok' });
  const uid = ws.sent[1].uid;
  ws.push({ type: 'subscription', event: 'init', uid, position: pos(2) });
  ws.push({ type: 'auth', status: 'error', error: { code: 'TOKEN_EXPIRED', message: 'Token expired.' } });
  await tick();
  assert.deepEqual(ws.sent.at(-1), { type: 'auth', access_token: 'tok2' });
  ws.push({ type: 'auth', status: 'ok' });
  const re = ws.sent.at(-1);
  assert.equal(re.type, 'subscribe');
  assert.deepEqual(re.since, pos(2));
  assert.notEqual(re.uid, uid);
  // A stale frame of the old uid is ignored.
  ws.push({ type: 'subscription', event: 'create', data: [{ id: 1 }], uid, position: pos(3) });
  assert.equal(got.length, 1);
  c.close();
});

test('strict mode puts the token in the URL', async () => {
  const c = new Client({ url: 'ws://h/websocket', mode: 'strict', token: 's 1', WebSocket: FakeWS });
  await tick();
  assert.equal(last().url, 'ws://h/websocket?access_token=s%201');
  c.close();
});

test('live view sorts and limits', async () => {
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS });
  const v = c.view('orders', { sort: ['-total'], limit: 2 });
  await tick();
  const ws = last();
  const uid = ws.sent[0].uid;
  assert.deepEqual(ws.sent[0].query, { limit: -1 });
  let changes = 0;
  v.onChange(() => changes++);
  ws.push({ type: 'subscription', event: 'init', data: [], uid, position: pos(0) },
          { type: 'subscription', event: 'create', data: [{ id: 1, total: 5 }, { id: 2, total: 9 }, { id: 3, total: 7 }], uid, position: pos(1) },
          { type: 'subscription', event: 'delete', data: [2], uid, position: pos(2) });
  assert.deepEqual(v.items.map((i) => i.id), [3, 1]);
  assert.equal(changes, 3);
  c.close();
});

test('a refused connection reported only as `error` (Node 20) still reconnects', async () => {
  // Node 20's WebSocket on a refused connection: `error` with readyState CONNECTING, and no
  // `close` ever follows.
  let refusals = 2;
  class RefusedWS {
    constructor(url) {
      if (refusals-- <= 0) return new FakeWS(url);
      this.readyState = 0;
      queueMicrotask(() => this.onerror?.({}));
    }
    send() { throw new Error('not open'); }
    close() {}
  }
  const states = [];
  const c = new Client({ url: 'ws://x', WebSocket: RefusedWS, reconnect: { initialDelayMs: 1 }, random: () => 0 });
  c.onState((s) => states.push(s));
  for (let i = 0; i < 40 && c.state !== 'open'; i++) await tick();
  assert.equal(c.state, 'open');
  assert.equal(c.connects, 3);
  assert.deepEqual(states, ['reconnecting', 'open']);
  c.close();
});

test('a shutdown close reason with a position advances older positions of that epoch', async () => {
  assert.deepEqual(positionInReason('server shutting down: reconnect elsewhere since {"epoch":"e1","offset":44}'), pos(44));
  assert.equal(positionInReason('server shutting down: reconnect elsewhere'), undefined);
  assert.equal(positionInReason('x since {"epoch":"e1","offset":-1}'), undefined);
  assert.equal(positionInReason('x since {nope}'), undefined);
  assert.equal(positionInReason(undefined), undefined);

  const c = new Client({ url: 'ws://x', WebSocket: FakeWS, reconnect: { initialDelayMs: 1 }, random: () => 0 });
  const behind = c.subscribe('orders', { query: { filter: { a: { _eq: 1 } } } });
  const ahead = c.subscribe('orders');
  const other = c.subscribe('orders', { event: 'create' });
  await tick();
  let ws = last();
  const [u1, u2, u3] = ws.sent.map((m) => m.uid);
  ws.push({ type: 'subscription', event: 'init', data: [], uid: u1, position: pos(3) },
          { type: 'subscription', event: 'init', data: [], uid: u2, position: pos(50) },
          { type: 'subscription', event: 'init', uid: u3, position: { epoch: 'e0', offset: 1 } });
  ws.drop('server shutting down: reconnect elsewhere since {"epoch":"e1","offset":44}');
  await tick(); await tick();
  ws = last();
  const since = Object.fromEntries(ws.sent.map((m) => [m.event ?? (m.query?.filter ? 'behind' : 'ahead'), m.since]));
  assert.deepEqual(since.behind, pos(44), 'moved up to the close position');
  assert.deepEqual(since.ahead, pos(50), 'a later position is kept');
  assert.deepEqual(since.create, { epoch: 'e0', offset: 1 }, 'another epoch is kept');
  assert.ok(behind && ahead && other);
  c.close();
});

test('subscribe asks for checkpoints; a checkpoint moves the position, is not data, folded frames keep it', async () => {
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS, reconnect: { initialDelayMs: 1 }, random: () => 0 });
  const sub = c.subscribe('prices');
  const got = [];
  const checkpoints = [];
  sub.on((m) => got.push(m));
  sub.onCheckpoint((p) => checkpoints.push({ p, position: sub.position }));
  await tick();
  let ws = last();
  const first = ws.sent.find((m) => m.type === 'subscribe');
  assert.equal(first.checkpoints, true);
  const uid = first.uid;
  ws.push({ type: 'subscription', event: 'init', data: [{ id: 1, v: 0 }], uid, position: pos(3) },
          { type: 'subscription', event: 'update', data: [{ id: 1, v: 1 }], uid, position: pos(4) });
  assert.deepEqual(sub.position, pos(4));
  // Folded frames (merged for a slow reader) carry no position: the position stays.
  ws.push({ type: 'subscription', event: 'update', data: [{ id: 1, v: 9 }], uid },
          { type: 'subscription', event: 'delete', data: [2], uid });
  assert.deepEqual(sub.position, pos(4), 'a folded frame never moves the position');
  ws.push({ type: 'subscription', event: 'checkpoint', uid, position: pos(40) });
  assert.deepEqual(sub.position, pos(40));
  assert.deepEqual(checkpoints, [{ p: pos(40), position: pos(40) }], 'the callback sees the moved position');
  assert.deepEqual(got.map((m) => m.event), ['init', 'update', 'update', 'delete'], 'a checkpoint is no data frame');
  // An older checkpoint of the same epoch never moves it back; another epoch's does.
  ws.push({ type: 'subscription', event: 'checkpoint', uid, position: pos(30) });
  assert.deepEqual(sub.position, pos(40));
  ws.push({ type: 'subscription', event: 'checkpoint', uid, position: { epoch: 'e2', offset: 5 } });
  assert.deepEqual(sub.position, { epoch: 'e2', offset: 5 });
  ws.push({ type: 'subscription', event: 'checkpoint', uid, position: pos(50) },
          { type: 'subscription', event: 'checkpoint', uid, position: { epoch: 'e1', offset: -1 } },
          { type: 'subscription', event: 'checkpoint', uid });
  assert.deepEqual(sub.position, pos(50), 'a checkpoint without a valid position is ignored');
  assert.equal(checkpoints.length, 4);
  // The next resume starts from the checkpoint, and asks for checkpoints again.
  ws.drop();
  await tick(); await tick();
  ws = last();
  const again = ws.sent.find((m) => m.type === 'subscribe');
  assert.deepEqual(again.since, pos(50));
  assert.equal(again.checkpoints, true);
  assert.equal(got.length, 4);
  c.close();
});

test('a checkpoint never reaches the iterator or a live view', async () => {
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS });
  const sub = c.subscribe('prices');
  const v = c.view('prices');
  await tick();
  const ws = last();
  const [u1, u2] = ws.sent.map((m) => m.uid);
  let changes = 0;
  v.onChange(() => changes++);
  for (const uid of [u1, u2]) {
    ws.push({ type: 'subscription', event: 'init', data: [{ id: 1, v: 0 }, { id: 2, v: 0 }], uid, position: pos(1) },
            { type: 'subscription', event: 'update', data: [{ id: 1, v: 7 }], uid },
            { type: 'subscription', event: 'delete', data: [2], uid },
            { type: 'subscription', event: 'checkpoint', uid, position: pos(9) },
            { type: 'subscription', event: 'create', data: [{ id: 3, v: 1 }], uid, position: pos(10) });
  }
  const seen = [];
  for await (const m of sub) {
    seen.push(m);
    if (seen.length === 4) break;
  }
  assert.deepEqual(seen.map((m) => m.event), ['init', 'update', 'delete', 'create']);
  assert.deepEqual(v.items, [{ id: 1, v: 7 }, { id: 3, v: 1 }]);
  assert.equal(v.frames, 4);
  assert.equal(changes, 4);
  assert.deepEqual(v.subscription.position, pos(10));
  c.close();
});

test('maxRate is sent as max_rate on subscribe and again on every resume; absent without it', async () => {
  const c = new Client({ url: 'ws://x', WebSocket: FakeWS, reconnect: { initialDelayMs: 1 }, random: () => 0 });
  const rated = c.subscribe('prices', { query: { limit: -1 }, maxRate: 0.5 });
  const plain = c.subscribe('prices');
  await tick();
  let ws = last();
  let sent = ws.sent.filter((m) => m.type === 'subscribe');
  assert.equal(sent.length, 2);
  const first = sent.find((m) => m.max_rate !== undefined);
  assert.equal(first.max_rate, 0.5);
  assert.deepEqual(first.query, { limit: -1 });
  assert.ok(!('maxRate' in first), 'the wire name is max_rate');
  const other = sent.find((m) => m !== first);
  assert.ok(!('max_rate' in other), 'no max_rate without maxRate');
  ws.push({ type: 'subscription', event: 'init', data: [], uid: first.uid, position: pos(3) });
  ws.drop();
  await tick(); await tick();
  ws = last();
  sent = ws.sent.filter((m) => m.type === 'subscribe');
  const again = sent.find((m) => m.max_rate !== undefined);
  assert.equal(again.max_rate, 0.5, 'resent on resume');
  assert.deepEqual(again.since, pos(3));
  assert.ok(!('max_rate' in sent.find((m) => m !== again)));
  assert.ok(rated && plain);
  c.close();
});
