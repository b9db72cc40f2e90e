// Types of the rooms script (gateway-rooms.js, gateway-rooms.mjs; `import "pg-ws-gateway/rooms"`):
// importing it gives every Gateway its room() method.
import type { GatewayError, GatewayEvent, MessageFrame, PublishOptions, Published, SubscribeOptions } from "./gateway.js";

/** The state a connection tracks in a room: a JSON object of at most 1 KB encoded. */
export type RoomState = { [key: string]: unknown };

/** One connection in a room, with the state it tracked. */
export interface RoomPresence<State extends object = RoomState> {
  user: string;
  conn: string;
  state: State;
}

/** One user in a room, with each of its connections (two tabs: two entries). */
export interface RoomMember<State extends object = RoomState> {
  user: string;
  conns: { conn: string; state: State }[];
}

/** Options of `room()`: those of `subscribe()` for the room's topic, plus its events. */
export interface RoomOptions<Row = unknown, Data = unknown> extends Omit<SubscribeOptions, "onMessage"> {
  /** Every event on the room's topic (rows, durable messages), as `subscribe`'s `onEvent`. */
  onEvent?: (event: GatewayEvent<Row, Data>) => void;
  /** The room's errors, and a failed track after a reconnect; else the connection's `onError`. */
  onError?: (error: GatewayError) => void;
}

/** A room: its topic's messages and its members' presence with their state. */
export declare class Room<State extends object = RoomState, Data = unknown> {
  readonly topic: string;
  /** Connection id -> who and with what state, kept current. */
  readonly conns: Map<string, RoomPresence<State>>;
  /** Every member, one entry per user, sorted by user id. */
  readonly members: RoomMember<State>[];
  /** What this connection tracks (sent again after every reconnect), or null. */
  readonly tracked: State | null;
  /**
   * Join the room's presence with `state`, or replace this connection's state (the gateway
   * sends at most one change a second per connection). Resolves once confirmed; while
   * disconnected, with null at once (sent when the connection is back).
   */
  track(state: State): Promise<{ type: "tracked"; topic: string; id: number } | null>;
  /** Leave the room's presence; the room's messages and members keep coming. */
  untrack(): Promise<{ type: "untracked"; topic: string; id: number } | null>;
  /** `gw.publish(room.topic, data, options)`. */
  publish(data: Data, options?: PublishOptions): Promise<Published>;
  /** The member list changed (after each snapshot and each change). Each `on*` returns its remover. */
  onSync(listener: (members: RoomMember<State>[]) => void): () => void;
  /** A connection joined (each one already there, at the first snapshot). */
  onJoin(listener: (presence: RoomPresence<State>) => void): () => void;
  /** A connection left: untracked, closed, or its replica died. */
  onLeave(listener: (presence: RoomPresence<State>) => void): () => void;
  /** A connection tracked a new state. */
  onUpdate(listener: (presence: RoomPresence<State>, before: RoomPresence<State>) => void): () => void;
  /** A message on the room's topic: ephemeral (`type: "message"`) or durable (an event, `op: "message"`). */
  onMessage(listener: (message: MessageFrame<Data> | (GatewayEvent<unknown, Data> & { op: "message" })) => void): () => void;
  /** Untrack and end the room's subscriptions. */
  leave(): void;
}

declare module "./gateway.js" {
  interface Gateway {
    /**
     * Enter the room `topic`: subscribes to it and to `presence:<topic>` (read access to the
     * topic suffices for both). One room per topic and connection; `subscribe(topic)` and a
     * room on the same topic exclude each other (pass `onEvent` here instead).
     */
    room<State extends object = RoomState, Data = unknown, Row = unknown>(
      topic: string,
      options?: RoomOptions<Row, Data>,
    ): Room<State, Data>;
  }
}
