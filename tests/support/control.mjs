// The JavaScript side of tests/support/control.rs: start, restart and stop `tidings serve`
// children through the control API of the Rust test that runs the suite, bounded waits, and
// the broker's HTTP side (an accepted publish, a metric's value).
// Shared by clients/js/test/{integration,conflation}.mjs and tests/browser/browser.test.mjs.

import assert from 'node:assert/strict';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` (sync or async) every 10 ms until it is truthy; throws after `ms`. */
export async function waitFor(what, cond, ms = 15_000) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await cond();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** The control API at `url`: `broker(args)`, `restart(id)`, `stopAll()`. */
export function controlApi(url) {
  const started = [];
  async function call(path, body = {}) {
    const res = await fetch(`${url}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`control ${path}: ${res.status} ${text}`);
    return JSON.parse(text);
  }
  return {
    /** `tidings serve --listen 127.0.0.1:0 ARGS…` → `{ id, http, ws }`. */
    async broker(args) {
      const b = await call('/brokers', { args });
      started.push(b.id);
      return b;
    },
    /** SIGTERM, then the same flags on the same address; resolves once it listens. */
    restart: (id) => call(`/brokers/${id}/restart`),
    async stopAll() {
      for (const id of started.splice(0)) await call(`/brokers/${id}/stop`).catch(() => {});
    },
  };
}

/** `POST /v1/publish` of `body` (one event or an array), which must be accepted: the 202 body. */
export async function accepted(http, body) {
  const res = await fetch(`${http}/v1/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 202, text);
  return JSON.parse(text);
}

/** The sum of every sample of metric `name` (all label sets) on `http`/metrics. */
export async function metric(http, name) {
  const text = await (await fetch(`${http}/metrics`)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.split(' ').at(-1));
  }
  return sum;
}
