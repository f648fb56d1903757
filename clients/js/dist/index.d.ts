/** Where a subscription stands in its collection's log (protocol/README.md §5a). */
export interface Position {
    epoch: string;
    offset: number;
}
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';
export type AuthMode = 'public' | 'handshake' | 'strict';
export type TokenProvider = () => string | Promise<string>;
/** The minimal WebSocket surface the client uses (browser WebSocket, Node's, or `ws`). */
export interface WebSocketLike {
    readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    onopen: ((ev: unknown) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((ev: unknown) => void) | null;
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;
export interface ReconnectOptions {
    /** First delay, before jitter (default 250 ms). */
    initialDelayMs?: number;
    /** Largest delay, before jitter (default 10 s). */
    maxDelayMs?: number;
    /** Attempts in a row before giving up and going `closed` (default: never give up). */
    maxAttempts?: number;
}
export interface ClientOptions {
    /** `ws://host:port/websocket` (or `http(s)://host:port`, `/websocket` is added). */
    url: string;
    /** Base of the HTTP API for `publish` (default: derived from `url`). */
    httpUrl?: string;
    mode?: AuthMode;
    /** A token, or a function asked for one on every connect and on `TOKEN_EXPIRED`. */
    token?: string | TokenProvider;
    /** Publisher key for `publish` (trusted services only: never ship it to a browser). */
    publishKey?: string;
    reconnect?: ReconnectOptions | false;
    WebSocket?: WebSocketConstructor;
    fetch?: typeof fetch;
    /** Source of jitter in [0, 1) (tests pass a fixed one). */
    random?: () => number;
}
export interface SubscribeOptions {
    event?: 'create' | 'update' | 'delete';
    item?: string | number;
    query?: Record<string, unknown>;
    /**
     * At most this many frames per item key per second (sent as `max_rate`, 0.01..=1000,
     * fractions allowed; protocol/README.md §5c). Only on a collection with retained state and
     * without `event`: otherwise the broker answers `INVALID_PAYLOAD` on `sub.onError`.
     */
    maxRate?: number;
}
/**
 * One frame as a subscriber sees it. `reset` replaces `init` when a resume could not be
 * recovered (`recovered: false`): the app must replace its state with `data`.
 */
export interface SubscriptionMessage {
    event: 'init' | 'reset' | 'create' | 'update' | 'delete';
    data?: unknown;
    position?: Position;
    recovered?: boolean;
    cause?: 'enter' | 'leave';
}
export declare class TidingsError extends Error {
    readonly code: string;
    readonly status?: number | undefined;
    constructor(code: string, message: string, status?: number | undefined);
}
type Listener<T> = (value: T) => void;
/** Delay before reconnect attempt `attempt` (0-based): exponential, capped, half-jittered. */
export declare function backoffDelay(attempt: number, opts: ReconnectOptions, random: () => number): number;
/** `v` as a position, if it is one (`{"epoch": string, "offset": integer >= 0}`). */
export declare function asPosition(v: unknown): Position | undefined;
/** The position at the end of a shutdown close reason (`… since {"epoch":…,"offset":N}`). */
export declare function positionInReason(reason: unknown): Position | undefined;
/**
 * A subscription: an async iterator of frames and a callback source, fed from one unbounded
 * client-side queue so that no frame is ever dropped, however many arrive at once.
 */
export declare class Subscription implements AsyncIterable<SubscriptionMessage> {
    private readonly client;
    readonly collection: string;
    readonly options: SubscribeOptions;
    /**
     * The `since` of the next resume: the last safe position received, from `init`, a
     * checkpoint, or a frame that carries one. A conflated (folded) frame carries none and
     * leaves it where it was: it stands for several events, so its offset would not be safe.
     */
    position: Position | undefined;
    /** The uid on the wire now (a fresh one per (re)subscribe, so stale frames are ignored). */
    wireUid: string;
    private queue;
    private waiters;
    private listeners;
    private errorListeners;
    private checkpointListeners;
    /** Whether the next init answers a `since` (so recovered:false is a reset). */
    resuming: boolean;
    closed: boolean;
    constructor(client: Client, collection: string, options: SubscribeOptions);
    /** Calls `cb` for every frame from now on; returns the function that stops it. */
    on(cb: Listener<SubscriptionMessage>): () => void;
    onError(cb: Listener<TidingsError>): () => void;
    /**
     * Calls `cb` with the position of every checkpoint from now on (protocol/README.md §5c:
     * sent after frames the broker merged for a slow reader; every event up to it has been
     * delivered). A checkpoint carries no data: it is never a frame of `on` or the iterator.
     * `position` has already moved to it when `cb` runs. Returns the function that stops it.
     */
    onCheckpoint(cb: Listener<Position>): () => void;
    unsubscribe(): void;
    /** @internal */
    deliver(msg: SubscriptionMessage): void;
    /** @internal */
    checkpoint(at: Position): void;
    /** @internal */
    fail(err: TidingsError): void;
    /** @internal */
    end(): void;
    private iterating;
    [Symbol.asyncIterator](): AsyncIterator<SubscriptionMessage>;
}
export interface ViewQuery {
    filter?: unknown;
    fields?: string[] | string;
    /** Fields, `-` prefix for descending (Directus style). */
    sort?: string[] | string;
    limit?: number;
}
export interface ViewOptions {
    /** The primary key field (default `id`). */
    key?: string;
}
type Item = Record<string, unknown>;
/** Applies one frame to a keyed item map (exported for tests and custom stores). */
export declare function applyFrame(items: Map<string, Item>, msg: SubscriptionMessage, key: string): void;
/**
 * A live list: the current items matching a query, kept from `init` plus every create, update,
 * delete (and enter/leave) frame, sorted and limited on the client. Survives reconnects (resume,
 * or replacement on a reset).
 */
export declare class LiveView {
    private readonly map;
    private readonly listeners;
    private readonly sort;
    private readonly limit;
    private readonly stop;
    readonly subscription: Subscription;
    /** Frames applied so far. */
    frames: number;
    constructor(client: Client, collection: string, query: ViewQuery, opts: ViewOptions);
    /** The items now, sorted and limited. */
    get items(): Item[];
    /** Calls `cb` with the items after every frame. */
    onChange(cb: Listener<Item[]>): () => void;
    close(): void;
}
/** `POST /v1/publish` (one event); resolves with the broker's JSON answer. */
export declare function publish(httpUrl: string, collection: string, event: 'create' | 'update' | 'delete', data: unknown, opts?: {
    publishKey?: string;
    fetch?: typeof fetch;
}): Promise<unknown>;
/** A connection to a broker that keeps itself connected and its subscriptions resumed. */
export declare class Client {
    state: ConnectionState;
    private ws;
    private readonly subs;
    private readonly all;
    private readonly stateListeners;
    private readonly errorListeners;
    private nextUid;
    private attempt;
    private timer;
    private ready;
    private readonly opts;
    /** Connections opened so far (1 + reconnects). */
    connects: number;
    constructor(opts: ClientOptions);
    onState(cb: Listener<ConnectionState>): () => void;
    /** Errors not tied to one subscription (auth failures, rate limits). */
    onError(cb: Listener<TidingsError>): () => void;
    subscribe(collection: string, options?: SubscribeOptions): Subscription;
    view(collection: string, query?: ViewQuery, opts?: ViewOptions): LiveView;
    publish(collection: string, event: 'create' | 'update' | 'delete', data: unknown): Promise<unknown>;
    /** Closes for good: no reconnect; every subscription's iterator ends. */
    close(): void;
    /** @internal */
    dropSubscription(sub: Subscription): void;
    private setState;
    private token;
    private open;
    /**
     * A broker that shuts down closes with `1001` and, when all of the connection's
     * subscriptions are on one collection, ` since {"epoch":…,"offset":N}`: every event up to
     * that position was written before the close, matching or not. A subscription whose last
     * position is older (same epoch) resumes from it, so the new node replays less.
     */
    private adoptClosePosition;
    private scheduleReconnect;
    private onReady;
    private sendSubscribe;
    private send;
    private emitError;
    private onFrame;
}
/** Opens a client (same as `new Client(opts)`). */
export declare function connect(opts: ClientOptions): Client;
export {};
