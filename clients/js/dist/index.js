// Tidings client: the Directus realtime protocol plus Tidings' positions, resume and live views.
// Every subscribe asks for checkpoints (protocol/README.md §5c), so a subscription's resume
// position is always one the broker marked safe: `init`'s, a checkpoint's, or a frame's.
// Zero runtime dependencies: it uses the platform's WebSocket and fetch (browsers, Node >= 22,
// or Node 20 with --experimental-websocket, or any constructor passed as `WebSocket`).
export class TidingsError extends Error {
    code;
    status;
    constructor(code, message, status) {
        super(message);
        this.code = code;
        this.status = status;
        this.name = 'TidingsError';
    }
}
/** Delay before reconnect attempt `attempt` (0-based): exponential, capped, half-jittered. */
export function backoffDelay(attempt, opts, random) {
    const initial = opts.initialDelayMs ?? 250;
    const max = opts.maxDelayMs ?? 10_000;
    const base = Math.min(max, initial * 2 ** Math.min(attempt, 30));
    return Math.round(base / 2 + (base / 2) * random());
}
/** `v` as a position, if it is one (`{"epoch": string, "offset": integer >= 0}`). */
export function asPosition(v) {
    if (v === null || typeof v !== 'object')
        return undefined;
    const p = v;
    if (typeof p.epoch === 'string' && Number.isSafeInteger(p.offset) && p.offset >= 0) {
        return { epoch: p.epoch, offset: p.offset };
    }
    return undefined;
}
/** The position at the end of a shutdown close reason (`… since {"epoch":…,"offset":N}`). */
export function positionInReason(reason) {
    if (typeof reason !== 'string')
        return undefined;
    const m = / since (\{.*\})$/.exec(reason);
    if (!m)
        return undefined;
    try {
        return asPosition(JSON.parse(m[1]));
    }
    catch {
        // Not a position: nothing to adopt.
        return undefined;
    }
}
function wsUrl(url) {
    let u = url.replace(/^http(s?):\/\//, 'ws$1://');
    if (!/\/websocket\/?(\?|$)/.test(u))
        u = u.replace(/\/?(\?|$)/, '/websocket$1');
    return u;
}
function httpBase(url) {
    return url.replace(/^ws(s?):\/\//, 'http$1://').replace(/\/websocket.*$/, '').replace(/\/$/, '');
}
/**
 * A subscription: an async iterator of frames and a callback source, fed from one unbounded
 * client-side queue so that no frame is ever dropped, however many arrive at once.
 */
export class Subscription {
    client;
    collection;
    options;
    /**
     * The `since` of the next resume: the last safe position received, from `init`, a
     * checkpoint, or a frame that carries one. A conflated (folded) frame carries none and
     * leaves it where it was: it stands for several events, so its offset would not be safe.
     */
    position;
    /** The uid on the wire now (a fresh one per (re)subscribe, so stale frames are ignored). */
    wireUid = '';
    queue = [];
    waiters = [];
    listeners = new Set();
    errorListeners = new Set();
    checkpointListeners = new Set();
    /** Whether the next init answers a `since` (so recovered:false is a reset). */
    resuming = false;
    closed = false;
    constructor(client, collection, options) {
        this.client = client;
        this.collection = collection;
        this.options = options;
    }
    /** Calls `cb` for every frame from now on; returns the function that stops it. */
    on(cb) {
        this.listeners.add(cb);
        return () => this.listeners.delete(cb);
    }
    onError(cb) {
        this.errorListeners.add(cb);
        return () => this.errorListeners.delete(cb);
    }
    /**
     * Calls `cb` with the position of every checkpoint from now on (protocol/README.md §5c:
     * sent after frames the broker merged for a slow reader; every event up to it has been
     * delivered). A checkpoint carries no data: it is never a frame of `on` or the iterator.
     * `position` has already moved to it when `cb` runs. Returns the function that stops it.
     */
    onCheckpoint(cb) {
        this.checkpointListeners.add(cb);
        return () => this.checkpointListeners.delete(cb);
    }
    unsubscribe() {
        if (this.closed)
            return;
        this.client.dropSubscription(this);
        this.end();
    }
    /** @internal */
    deliver(msg) {
        if (msg.position)
            this.position = msg.position;
        for (const cb of this.listeners)
            cb(msg);
        // Frames queue for an iterator (also one not started yet); a callback-only consumer
        // leaves nothing behind.
        const waiter = this.waiters.shift();
        if (waiter)
            waiter({ value: msg, done: false });
        else if (this.iterating || this.listeners.size === 0)
            this.queue.push(msg);
    }
    /** @internal */
    checkpoint(at) {
        // Never backwards within an epoch: the position held is safe too, and going back would
        // replay events already applied.
        const p = this.position;
        if (!p || p.epoch !== at.epoch || p.offset <= at.offset)
            this.position = at;
        for (const cb of this.checkpointListeners)
            cb(at);
    }
    /** @internal */
    fail(err) {
        for (const cb of this.errorListeners)
            cb(err);
    }
    /** @internal */
    end() {
        this.closed = true;
        for (const w of this.waiters.splice(0))
            w({ value: undefined, done: true });
    }
    iterating = false;
    [Symbol.asyncIterator]() {
        this.iterating = true;
        return {
            next: () => {
                const msg = this.queue.shift();
                if (msg)
                    return Promise.resolve({ value: msg, done: false });
                if (this.closed)
                    return Promise.resolve({ value: undefined, done: true });
                return new Promise((resolve) => this.waiters.push(resolve));
            },
            return: () => {
                this.unsubscribe();
                return Promise.resolve({ value: undefined, done: true });
            },
        };
    }
}
/** Applies one frame to a keyed item map (exported for tests and custom stores). */
export function applyFrame(items, msg, key) {
    const list = (d) => (Array.isArray(d) ? d : d === undefined || d === null ? [] : [d]);
    const keyOf = (v) => {
        if (v !== null && typeof v === 'object') {
            const k = v[key];
            return k === undefined ? undefined : String(k);
        }
        return String(v);
    };
    switch (msg.event) {
        case 'init':
        case 'reset':
            if (msg.event === 'reset' || Array.isArray(msg.data))
                items.clear();
            for (const it of list(msg.data)) {
                const k = keyOf(it);
                if (k !== undefined && typeof it === 'object')
                    items.set(k, { ...it });
            }
            break;
        case 'create':
        case 'update':
            for (const it of list(msg.data)) {
                const k = keyOf(it);
                if (k === undefined || typeof it !== 'object')
                    continue;
                // An update carries the changed item as projected: merge onto what we hold.
                items.set(k, { ...(items.get(k) ?? {}), ...it });
            }
            break;
        case 'delete':
            for (const it of list(msg.data)) {
                const k = keyOf(it);
                if (k !== undefined)
                    items.delete(k);
            }
            break;
    }
}
function compareBy(sort) {
    return (a, b) => {
        for (const s of sort) {
            const desc = s.startsWith('-');
            const f = desc ? s.slice(1) : s;
            const x = a[f];
            const y = b[f];
            if (x === y)
                continue;
            if (x === undefined || x === null)
                return 1;
            if (y === undefined || y === null)
                return -1;
            const c = x < y ? -1 : 1;
            return desc ? -c : c;
        }
        return 0;
    };
}
/**
 * A live list: the current items matching a query, kept from `init` plus every create, update,
 * delete (and enter/leave) frame, sorted and limited on the client. Survives reconnects (resume,
 * or replacement on a reset).
 */
export class LiveView {
    map = new Map();
    listeners = new Set();
    sort;
    limit;
    stop;
    subscription;
    /** Frames applied so far. */
    frames = 0;
    constructor(client, collection, query, opts) {
        const key = opts.key ?? 'id';
        const sort = query.sort ?? [];
        this.sort = typeof sort === 'string' ? sort.split(',').filter(Boolean) : sort;
        this.limit = query.limit;
        // Every matching item, not Directus' default first 100: on a retained collection the
        // `init` is the current list, and the view sorts and limits it here.
        const wire = { limit: -1 };
        if (query.filter !== undefined)
            wire.filter = query.filter;
        if (query.fields !== undefined)
            wire.fields = query.fields;
        this.subscription = client.subscribe(collection, { query: wire });
        this.stop = this.subscription.on((msg) => {
            applyFrame(this.map, msg, key);
            this.frames += 1;
            const now = this.items;
            for (const cb of this.listeners)
                cb(now);
        });
    }
    /** The items now, sorted and limited. */
    get items() {
        const all = [...this.map.values()];
        if (this.sort.length)
            all.sort(compareBy(this.sort));
        return this.limit === undefined ? all : all.slice(0, this.limit);
    }
    /** Calls `cb` with the items after every frame. */
    onChange(cb) {
        this.listeners.add(cb);
        return () => this.listeners.delete(cb);
    }
    close() {
        this.stop();
        this.subscription.unsubscribe();
    }
}
/** `POST /v1/publish` (one event); resolves with the broker's JSON answer. */
export async function publish(httpUrl, collection, event, data, opts = {}) {
    const headers = { 'content-type': 'application/json' };
    if (opts.publishKey)
        headers.authorization = `Bearer ${opts.publishKey}`;
    const f = opts.fetch ?? fetch;
    const res = await f(`${httpBase(httpUrl)}/v1/publish`, {
        method: 'POST',
        headers,
        body: JSON.stringify({ collection, event, data }),
    });
    const body = await res.json().catch(() => null);
    if (!res.ok) {
        const err = body?.error;
        throw new TidingsError(err?.code ?? 'HTTP_ERROR', err?.message ?? `HTTP ${res.status}`, res.status);
    }
    return body;
}
/** A connection to a broker that keeps itself connected and its subscriptions resumed. */
export class Client {
    state = 'connecting';
    ws;
    subs = new Map();
    all = new Set();
    stateListeners = new Set();
    errorListeners = new Set();
    nextUid = 1;
    attempt = 0;
    timer;
    ready = false;
    opts;
    /** Connections opened so far (1 + reconnects). */
    connects = 0;
    constructor(opts) {
        this.opts = opts;
        if (!(opts.WebSocket ?? globalThis.WebSocket)) {
            throw new TidingsError('NO_WEBSOCKET', 'no global WebSocket: pass options.WebSocket');
        }
        void this.open();
    }
    onState(cb) {
        this.stateListeners.add(cb);
        return () => this.stateListeners.delete(cb);
    }
    /** Errors not tied to one subscription (auth failures, rate limits). */
    onError(cb) {
        this.errorListeners.add(cb);
        return () => this.errorListeners.delete(cb);
    }
    subscribe(collection, options = {}) {
        const sub = new Subscription(this, collection, options);
        this.all.add(sub);
        if (this.ready)
            this.sendSubscribe(sub);
        return sub;
    }
    view(collection, query = {}, opts = {}) {
        return new LiveView(this, collection, query, opts);
    }
    publish(collection, event, data) {
        return publish(this.opts.httpUrl ?? this.opts.url, collection, event, data, {
            publishKey: this.opts.publishKey,
            fetch: this.opts.fetch,
        });
    }
    /** Closes for good: no reconnect; every subscription's iterator ends. */
    close() {
        this.setState('closed');
        clearTimeout(this.timer);
        this.ws?.close(1000);
        for (const s of this.all)
            s.end();
        this.all.clear();
        this.subs.clear();
    }
    /** @internal */
    dropSubscription(sub) {
        this.all.delete(sub);
        if (sub.wireUid) {
            this.subs.delete(sub.wireUid);
            if (this.ready)
                this.send({ type: 'unsubscribe', uid: sub.wireUid });
        }
    }
    setState(s) {
        if (this.state === s)
            return;
        this.state = s;
        for (const cb of this.stateListeners)
            cb(s);
    }
    async token() {
        const t = this.opts.token;
        return typeof t === 'function' ? await t() : t;
    }
    async open() {
        const Ctor = this.opts.WebSocket ?? globalThis.WebSocket;
        if (!Ctor)
            return;
        let url = wsUrl(this.opts.url);
        const mode = this.opts.mode ?? 'public';
        let token;
        try {
            token = await this.token();
        }
        catch (e) {
            this.emitError(new TidingsError('TOKEN_PROVIDER', String(e)));
            return this.scheduleReconnect();
        }
        if (this.state === 'closed')
            return;
        if (mode === 'strict' && token)
            url += `${url.includes('?') ? '&' : '?'}access_token=${encodeURIComponent(token)}`;
        const ws = new Ctor(url);
        this.ws = ws;
        this.connects += 1;
        ws.onopen = () => {
            if (mode === 'handshake' || (mode === 'public' && token)) {
                this.send({ type: 'auth', access_token: token ?? '' });
            }
            else {
                this.onReady();
            }
        };
        ws.onmessage = (ev) => this.onFrame(String(ev.data));
        const lost = (reason) => {
            if (this.ws !== ws)
                return;
            this.adoptClosePosition(reason);
            this.ready = false;
            this.ws = undefined;
            this.subs.clear();
            if (this.state !== 'closed')
                this.scheduleReconnect();
        };
        // Node 20's WebSocket reports a refused connection only as `error` (no `close` follows,
        // readyState stays CONNECTING), so an error counts as the end of this socket too; `lost`
        // runs once per socket whichever comes first.
        ws.onerror = () => {
            lost(undefined);
            try {
                ws.close();
            }
            catch {
                // Closing a socket that never opened may throw; it is gone either way.
            }
        };
        ws.onclose = (ev) => lost(ev?.reason);
    }
    /**
     * A broker that shuts down closes with `1001` and, when all of the connection's
     * subscriptions are on one collection, ` since {"epoch":…,"offset":N}`: every event up to
     * that position was written before the close, matching or not. A subscription whose last
     * position is older (same epoch) resumes from it, so the new node replays less.
     */
    adoptClosePosition(reason) {
        const at = positionInReason(reason);
        if (!at)
            return;
        for (const sub of this.subs.values()) {
            const p = sub.position;
            if (p && p.epoch === at.epoch && p.offset < at.offset)
                sub.position = at;
        }
    }
    scheduleReconnect() {
        const r = this.opts.reconnect;
        if (r === false || (r?.maxAttempts !== undefined && this.attempt >= r.maxAttempts)) {
            this.close();
            return;
        }
        this.setState('reconnecting');
        const delay = backoffDelay(this.attempt, r ?? {}, this.opts.random ?? Math.random);
        this.attempt += 1;
        this.timer = setTimeout(() => void this.open(), delay);
    }
    onReady() {
        this.ready = true;
        this.attempt = 0;
        this.setState('open');
        for (const s of this.all)
            this.sendSubscribe(s);
    }
    sendSubscribe(sub) {
        if (sub.wireUid)
            this.subs.delete(sub.wireUid);
        sub.wireUid = `t${this.nextUid++}`;
        this.subs.set(sub.wireUid, sub);
        // `checkpoints`: on a conflating collection, the broker marks the safe resume positions
        // after merged frames (which carry none); elsewhere it changes nothing.
        const msg = {
            type: 'subscribe',
            collection: sub.collection,
            uid: sub.wireUid,
            checkpoints: true,
        };
        if (sub.options.event)
            msg.event = sub.options.event;
        if (sub.options.item !== undefined)
            msg.item = sub.options.item;
        if (sub.options.query)
            msg.query = sub.options.query;
        // Sent on every (re)subscribe: the broker keeps no rate across a resume.
        if (sub.options.maxRate !== undefined)
            msg.max_rate = sub.options.maxRate;
        sub.resuming = sub.position !== undefined;
        if (sub.position)
            msg.since = sub.position;
        this.send(msg);
    }
    send(msg) {
        if (this.ws && this.ws.readyState === 1)
            this.ws.send(JSON.stringify(msg));
    }
    emitError(err) {
        for (const cb of this.errorListeners)
            cb(err);
    }
    onFrame(text) {
        let msg;
        try {
            msg = JSON.parse(text);
        }
        catch {
            return;
        }
        const err = msg.error;
        switch (msg.type) {
            case 'ping':
                this.send({ type: 'pong' });
                return;
            case 'auth':
                if (msg.status === 'ok') {
                    if (!this.ready)
                        this.onReady();
                    else {
                        // A re-auth after TOKEN_EXPIRED: events sent while suspended were not delivered;
                        // resubscribing with `since` replays them.
                        for (const s of this.all) {
                            this.send({ type: 'unsubscribe', uid: s.wireUid });
                            this.sendSubscribe(s);
                        }
                    }
                }
                else if (err?.code === 'TOKEN_EXPIRED') {
                    void this.token().then((t) => this.send({ type: 'auth', access_token: t ?? '' }), (e) => this.emitError(new TidingsError('TOKEN_PROVIDER', String(e))));
                }
                else {
                    this.emitError(new TidingsError(err?.code ?? 'AUTH_FAILED', err?.message ?? 'auth failed'));
                }
                return;
            case 'subscription': {
                const sub = this.subs.get(String(msg.uid));
                if (!sub || msg.event === 'unsubscribe')
                    return;
                if (msg.event === 'checkpoint') {
                    const at = asPosition(msg.position);
                    if (at)
                        sub.checkpoint(at);
                    return;
                }
                const out = { event: msg.event };
                if ('data' in msg)
                    out.data = msg.data;
                if (msg.position)
                    out.position = msg.position;
                if (msg.cause)
                    out.cause = msg.cause;
                if (msg.event === 'init') {
                    if (msg.recovered !== undefined)
                        out.recovered = msg.recovered;
                    const resumed = sub.resuming;
                    sub.resuming = false;
                    // A recovered resume continues the stream: nothing to tell. A lost one is a reset.
                    if (resumed && msg.recovered === true) {
                        if (out.position)
                            sub.position = out.position;
                        return;
                    }
                    if (resumed)
                        out.event = 'reset';
                }
                sub.deliver(out);
                return;
            }
            default:
                if (msg.status === 'error' && err) {
                    const e = new TidingsError(err.code ?? 'ERROR', err.message ?? '');
                    const sub = msg.uid !== undefined ? this.subs.get(String(msg.uid)) : undefined;
                    if (sub)
                        sub.fail(e);
                    else
                        this.emitError(e);
                }
        }
    }
}
/** Opens a client (same as `new Client(opts)`). */
export function connect(opts) {
    return new Client(opts);
}
