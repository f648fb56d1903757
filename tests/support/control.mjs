// The JavaScript side of tests/support/control.rs: start, restart and stop `tidings serve`
// children through the control API of the Rust test that runs the suite, and bounded waits.
// Shared by clients/js/test/integration.mjs and tests/browser/browser.test.mjs.

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
