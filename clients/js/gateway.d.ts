// Types of the pg-ws-gateway browser client (gateway.js, gateway.mjs): protocol version 1.
// The wire protocol itself is docs/protocol.md; its codes are gateway/protocol.py, which
// tests/test_js_package.py compares with the unions below.

/** The connection's state, as reported to `onState` and held in `Gateway.state`. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** What comes with each state. */
export interface StateDetails {
  /** `attempt`: how many tries in a row have failed before this one (0 after a stable connection). */
  connecting: { attempt: number };
  /** Authenticated: `user` is the token's subject, `conn` the gateway's id for this connection. */
  open: { user: string; conn: string };
  /**
   * The connection dropped; the next try is in `delay` ms (full-jitter backoff up to 20 s,
   * or within a second when the page becomes visible or the browser comes back online).
   * `code`: the WebSocket close code (1006: the network), 0 when the token function failed,
   * null when the client itself reconnects (the token is now another user's).
   */
  reconnecting: { delay: number; code: number | null; reason?: string; attempt: number };
  /** For good: closed by the application (1000), or a close code retrying cannot fix. */
  closed: { code: number; reason: string };
}

/**
 * `onState`'s second argument: the fields of `StateDetails[state]`, the others absent.
 * (One flat type rather than a union narrowed by `state`: TypeScript then rejects a listener
 * taking the state alone, `(state) => setState(state)`.)
 */
export type StateDetail = Partial<StateDetails["connecting"] & StateDetails["open"] & StateDetails["reconnecting"] & StateDetails["closed"]>;

/** A state listener: `(state, detail) => { if (state === "open") console.log(detail.user) }`. */
export type StateListener = (state: ConnectionState, detail: StateDetail) => void;

/** A token, or a function returning one (called at every connect and before expiry). */
export type TokenSource = string | (() => string | Promise<string>);

export interface ConnectOptions {
  /** The JWT, or a (async) function returning a fresh one; a function lets the client refresh in-band. */
  token: TokenSource;
  /** Every state change. More listeners: `Gateway.onState`. */
  onState?: StateListener;
  /** Errors no subscription owns (token failures, a final close...); without it they go to the console. */
  onError?: (error: GatewayError) => void;
  /** Mark the user "away" while the page is hidden (default true). */
  autoAway?: boolean;
}

/** A place in a topic's stream: resume after it with `subscribe(topic, fn, { since })`. */
export interface Position {
  pos: number;
  epoch: string;
}

/** What a change on a topic carries. `Row`: the table's row as JSON; `Data`: a `message` event's data. */
export type GatewayEvent<Row = unknown, Data = unknown> =
  | (EventBase & { op: "insert"; table: string; key: string; row: Row })
  | (EventBase & { op: "update"; table: string; key: string; row: Row })
  | (EventBase & { op: "delete"; table: string; key: string })
  | (EventBase & { op: "message"; data: Data; from?: string });

interface EventBase {
  type: "event";
  topic: string;
  epoch: string;
  /** Gap-free per topic and epoch, in commit order. */
  pos: number;
  /** Unix seconds when the writing transaction began. */
  ts?: number;
}

/** The operation of an event. */
export type Op = GatewayEvent["op"];

/** `onSubscribed`: the subscription is live after `pos`. */
export interface SubscribedInfo {
  topic: string;
  epoch: string;
  pos: number;
  /** Present when resuming: true if every missed event was replayed, false if some are gone. */
  recovered?: boolean;
  /** How many events were replayed before this. */
  replayed: number;
}

/** `onNotRecovered`: events were missed for good (too old for the log, or a new epoch): reload your state. */
export interface NotRecoveredInfo {
  topic: string;
  epoch: string;
  pos: number;
  recovered: false;
  replayed?: number;
}

export interface SubscribeOptions {
  /** Resume after this position (e.g. the one your API returned with a snapshot of the rows). */
  since?: Position;
  onSubscribed?: (info: SubscribedInfo) => void;
  onNotRecovered?: (info: NotRecoveredInfo) => void;
  /** This subscription's errors; `forbidden`, `removed`, `bad_topic`... end it, `unavailable` and `rate_limited` are retried. */
  onError?: (error: GatewayError) => void;
  /** Ephemeral messages published on the topic (`publish(topic, data)`): live only, never replayed. */
  onMessage?: (message: MessageFrame) => void;
}

/**
 * An ephemeral message: sent live to the topic's subscribers, with no position, never stored
 * or replayed, best effort (a message sent while this connection was down is not received).
 * A durable one arrives as an event instead, `op: "message"`, with its position.
 */
export interface MessageFrame<Data = unknown> {
  type: "message";
  topic: string;
  /** The sender's user id, set by the gateway from its token. */
  from: string;
  /** The sender's connection (`Gateway.conn` in the sender's tab), when a browser sent it. */
  conn?: string;
  data: Data;
}

export interface PublishOptions {
  /** Store it in the topic's log: it gets a position, is replayed on resume (default false). */
  durable?: boolean;
  /** false: this connection does not receive its own message (default true). */
  echo?: boolean;
}

/** The gateway's acknowledgment of a publish; `pos` and `epoch` for a durable one, once committed. */
export interface Published {
  type: "published";
  topic: string;
  id: number;
  epoch?: string;
  pos?: number;
}

/** Presence statuses; `offline` arrives as a change and removes the user from `users`. */
export type PresenceStatus = "online" | "away" | "offline";

export interface PresenceEntry {
  user: string;
  status: PresenceStatus;
  /** Unix seconds. */
  last_seen: number;
}

/** Who is on a presence topic, by user id, kept current by the client. */
export type PresenceUsers = Map<string, PresenceEntry>;

export interface PresenceOptions {
  /** The whole list (at subscribe, and again after a reconnect). */
  onSnapshot?: (snapshot: PresenceEntry[], users: PresenceUsers) => void;
  /** One user's new status. */
  onChange?: (change: PresenceEntry, users: PresenceUsers) => void;
  onError?: (error: GatewayError) => void;
}

/** Ends a subscription; calling it twice is harmless. */
export type Unsubscribe = () => void;

/** Ends a presence subscription; `users` is the live map of who is there. */
export type PresenceSubscription = Unsubscribe & { readonly users: PresenceUsers };

/** The `code` of an error frame (gateway/protocol.py ErrorCode, docs/protocol.md). */
export type ServerErrorCode =
  | "bad_json"
  | "bad_message"
  | "binary_frame"
  | "not_authenticated"
  | "already_authenticated"
  | "bad_token"
  | "token_user_changed"
  | "bad_topic"
  | "forbidden"
  | "already_subscribed"
  | "not_subscribed"
  | "too_large"
  | "too_many_subscriptions"
  | "rate_limited"
  | "unavailable"
  | "presence_disabled"
  | "removed"
  | "not_tracked"
  | "too_many_tracked";

/**
 * Errors of the client itself: `token` (the token function failed or gave no string),
 * `bad_frame` (the server sent something that is not JSON), `closed` (closed for good;
 * `closeCode` and `reason` say why), `disconnected` (a publish or track while not connected:
 * not sent; or the connection dropped before its answer: a durable publish may or may not
 * have been stored).
 */
export type ClientErrorCode = "token" | "bad_frame" | "closed" | "disconnected";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

export interface GatewayError extends Error {
  code: ErrorCode;
  /** The topic the error is about, if any. */
  topic?: string;
  /** The id of the request it answers, if any. */
  id?: number;
  /** Set when the client retries by itself (`unavailable`, `rate_limited` on a subscribe). */
  willRetry?: boolean;
  /** With code `closed`: the WebSocket close code. */
  closeCode?: number;
  reason?: string;
}

/** WebSocket close codes the gateway sends, by name (gateway/protocol.py CloseCode). */
export interface CloseCodes {
  NORMAL: 1000;
  /** The gateway is stopping; the client reconnects with backoff. */
  GOING_AWAY: 1001;
  /** A malformed WebSocket frame: a client bug; final. */
  PROTOCOL_ERROR: 1002;
  /** A text frame that is not UTF-8; final. */
  INVALID_PAYLOAD: 1007;
  /** A frame over the size limit; final. */
  MESSAGE_TOO_BIG: 1009;
  /** Draining for a deploy; the client reconnects at once, to another replica. */
  SERVICE_RESTART: 1012;
  /** Connection limit reached on this replica; reconnect with backoff. */
  TRY_AGAIN_LATER: 1013;
  /** No valid token; final. */
  UNAUTHORIZED: 4001;
  /** No auth frame in time; reconnect. */
  AUTH_TIMEOUT: 4004;
  /** The token expired with no refresh; reconnect with a fresh one. */
  TOKEN_EXPIRED: 4005;
  /** The client read too slowly; reconnect. */
  SLOW_CONSUMER: 4008;
  /** The application's server disconnected this user (HTTP API); final. */
  DISCONNECTED: 4010;
  /** The application's server asked for a reconnect with a fresh token (HTTP API); reconnect. */
  REAUTHENTICATE: 4011;
  /** The client kept sending over its rate limit; reconnect with backoff. */
  RATE_LIMITED: 4029;
}

export type CloseCode = CloseCodes[keyof CloseCodes];

/** The close codes after which the client reconnects (gateway/protocol.py RECONNECT_AFTER). */
export type ReconnectCode = 1001 | 1012 | 1013 | 4004 | 4005 | 4008 | 4011 | 4029;

/** One connection to the gateway, reconnecting and resubscribing by itself until `close()`. */
export declare class Gateway {
  constructor(url: string | URL | undefined, options: ConnectOptions);
  /** The ws(s): URL connected to. */
  readonly url: string;
  readonly options: ConnectOptions;
  readonly state: ConnectionState;
  /** The authenticated user, once open. */
  readonly user?: string;
  /** The gateway's id for the current connection, once open. */
  readonly conn?: string;
  /**
   * Receive every change on `topic`, in order, from now or from `options.since`, across
   * reconnects. One subscription per topic at a time (call its unsubscribe first).
   */
  subscribe<Row = unknown, Data = unknown>(
    topic: string,
    onEvent: (event: GatewayEvent<Row, Data>) => void,
    options?: SubscribeOptions,
  ): Unsubscribe;
  /** Who is online on a `presence:` topic. */
  presence(topic: `presence:${string}`, options?: PresenceOptions): PresenceSubscription;
  /**
   * Send `data` (any JSON value) to the topic's subscribers: needs a `publish` grant for the
   * topic, not a subscription. Resolves once the gateway accepted it (a durable message: once
   * committed, with its position); rejects with a `GatewayError` (`forbidden`, `too_large`,
   * `rate_limited`, `bad_topic`, `disconnected`...). Not queued while disconnected.
   */
  publish(topic: string, data: unknown, options?: PublishOptions): Promise<Published>;
  /** This connection's presence status (the client sends "away" by itself while the page is hidden). */
  setStatus(status: "online" | "away"): void;
  /** Another state listener; returns the function removing it. */
  onState(listener: StateListener): () => void;
  /** Close for good (state "closed", code 1000); no more reconnects. */
  close(): void;
}

/**
 * Open a connection: to `url` (`wss://host/ws`, `https://host/ws`, or a path on this page's
 * host), or to `/ws` on this page's host when only the options are given.
 */
export declare function connect(options: ConnectOptions): Gateway;
export declare function connect(url: string | URL | undefined, options: ConnectOptions): Gateway;

export declare const RECONNECT_AFTER: readonly ReconnectCode[];

/** The classic script's `window.PgGateway`, and this module's default export. */
declare const PgGateway: {
  connect: typeof connect;
  Gateway: typeof Gateway;
  RECONNECT_AFTER: typeof RECONNECT_AFTER;
};
export default PgGateway;

/** With `<script src=".../gateway.js">`, these types are the global `PgGateway`. */
export as namespace PgGateway;
