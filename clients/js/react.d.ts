// Types of pg-ws-gateway/react (react.mjs). No React types are needed to use them: the hooks
// take and return plain values; GatewayProvider is a function component.
import type {
  ConnectionState,
  Gateway,
  GatewayError,
  GatewayEvent,
  NotRecoveredInfo,
  Position,
  MessageFrame,
  PresenceEntry,
} from "pg-ws-gateway";
import type { Room, RoomMember, RoomState } from "pg-ws-gateway/rooms";

export interface GatewayProviderProps {
  /** The connection the hooks below it use (from `connect()`); closing it is up to the application. */
  gateway: Gateway;
  children?: unknown;
}

/** Makes `gateway` the one `useTopic`, `usePresence`... use in this subtree. */
export declare function GatewayProvider(props: GatewayProviderProps): any;

/** `gateway`, else the nearest GatewayProvider's; throws when there is neither. */
export declare function useGateway(gateway?: Gateway): Gateway;

/** The connection's state, re-rendering as it changes. */
export declare function useConnectionState(gateway?: Gateway): ConnectionState;

export interface UseTopicOptions<Row = unknown, Data = unknown> {
  /** The connection to use instead of the GatewayProvider's. */
  gateway?: Gateway;
  /** The rows to start from, by key (event.key: the primary key as text), e.g. a snapshot from your API. */
  rows?: ReadonlyMap<string, Row> | ReadonlyArray<readonly [string, Row]> | Readonly<Record<string, Row>>;
  /** The position that snapshot was taken at: resume after it (nothing missed in between). */
  since?: Position;
  /** How many recent events `events` keeps (default 100; 0 keeps none). */
  limit?: number;
  onEvent?: (event: GatewayEvent<Row, Data>) => void;
  /** Events were lost for good: reload the snapshot and pass its rows and position again. */
  onNotRecovered?: (info: NotRecoveredInfo) => void;
  onError?: (error: GatewayError) => void;
}

export interface TopicView<Row = unknown, Data = unknown> {
  /** The topic's rows by key: `options.rows`, then every insert and update applied, deletes removed. */
  rows: ReadonlyMap<string, Row>;
  /** The most recent events, oldest first. */
  events: ReadonlyArray<GatewayEvent<Row, Data>>;
  /** The connection's state. */
  state: ConnectionState;
  /** The gateway confirmed the subscription (it is resumed by itself after a reconnect). */
  subscribed: boolean;
  /** The last position seen. */
  position: Position | null;
  /** The subscription's last error (`forbidden`, `bad_topic`... end it). */
  error: GatewayError | Error | null;
  /** Set when events were lost for good: `rows` is no longer complete. */
  notRecovered: NotRecoveredInfo | null;
}

/**
 * Subscribe to `topic` while mounted (nothing while it is null or undefined). Hooks on the
 * same topic and connection share one subscription: the first one's `rows` and `since` start
 * it, each keeps its own `limit` of events, the last one to unmount ends it. A new `topic` or
 * `since` starts over.
 */
export declare function useTopic<Row = unknown, Data = unknown>(
  topic: string | null | undefined,
  options?: UseTopicOptions<Row, Data>,
): TopicView<Row, Data>;

export interface UsePresenceOptions {
  gateway?: Gateway;
}

export interface PresenceView {
  /** Who is there, by user id ("online" or "away"; users going offline are removed). */
  users: ReadonlyMap<string, PresenceEntry>;
  state: ConnectionState;
  error: GatewayError | Error | null;
}

/** Who is on a presence topic while mounted (nothing while it is null or undefined); hooks on one topic share its subscription. */
export declare function usePresence(
  topic: `presence:${string}` | null | undefined,
  options?: UsePresenceOptions,
): PresenceView;

export interface UseRoomOptions<State extends object = RoomState, Data = unknown> {
  gateway?: Gateway;
  /** This connection's state in the room, tracked while mounted (again when its JSON changes; `null` untracks). */
  state?: State | null;
  /** Each message of the room: ephemeral (`type: "message"`) or durable (an event, `op: "message"`). */
  onMessage?: (message: MessageFrame<Data> | (GatewayEvent<unknown, Data> & { op: "message" })) => void;
}

export interface RoomView<State extends object = RoomState, Data = unknown> {
  /** Who is in the room, one entry per user with each connection's state, sorted by user. */
  members: RoomMember<State>[];
  /** The room (to publish with), once entered; null before and after. */
  room: Room<State, Data> | null;
  state: ConnectionState;
  error: GatewayError | Error | null;
}

/**
 * The room `topic` while mounted (nothing while it is null or undefined). Needs
 * `import "pg-ws-gateway/rooms"` once in the application; one room per topic and connection.
 */
export declare function useRoom<State extends object = RoomState, Data = unknown>(
  topic: string | null | undefined,
  options?: UseRoomOptions<State, Data>,
): RoomView<State, Data>;
