// A typed use of pg-ws-gateway/react in components (tsc -p test checks it with React's types).
import { connect } from "pg-ws-gateway";
import { GatewayProvider, useConnectionState, usePresence, useRoom, useTopic } from "pg-ws-gateway/react";
import "pg-ws-gateway/rooms";

interface Task {
  id: number;
  title: string;
  status: "todo" | "doing" | "done";
}

function Board({ snapshot }: { snapshot: { rows: Task[]; pos: number; epoch: string } }) {
  const { rows, events, state, subscribed, error, notRecovered } = useTopic<Task>("board:demo", {
    rows: snapshot.rows.map((t) => [String(t.id), t] as const),
    since: { pos: snapshot.pos, epoch: snapshot.epoch },
    limit: 20,
    onNotRecovered: () => location.reload(),
  });
  const done = [...rows.values()].filter((t) => t.status === "done").length;
  return (
    <section>
      <p>
        {state} {subscribed ? "live" : "…"} {error?.message} {notRecovered ? "stale" : ""}
      </p>
      <p>{done} done</p>
      <ul>
        {events.map((e) => (
          <li key={e.pos}>{e.op === "message" ? "message" : `${e.op} ${e.key}`}</li>
        ))}
      </ul>
    </section>
  );
}

function Online() {
  const { users } = usePresence("presence:global");
  const state = useConnectionState();
  return <p title={state}>{[...users.values()].map((u) => `${u.user} (${u.status})`).join(", ")}</p>;
}

function Maybe({ id }: { id: number | null }) {
  const { rows } = useTopic(id == null ? null : `user:${id}`);
  // @ts-expect-error: rows are read-only
  rows.clear();
  // @ts-expect-error: presence topics start with "presence:"
  usePresence("room:1");
  return <span>{rows.size}</span>;
}

export function App() {
  const gw = connect({ token: "a.b.c" });
  return (
    <GatewayProvider gateway={gw}>
      <Board snapshot={{ rows: [], pos: 0, epoch: "e" }} />
      <Online />
      <Maybe id={null} />
    </GatewayProvider>
  );
}

// Rooms: members with their state, a state tracked while mounted, the room's messages.

export function Viewers({ color }: { color: string }) {
  const { members, room, error } = useRoom<{ color: string }, { x: number }>("board:7", {
    state: { color },
    onMessage: (m) => console.log(m.from, m.data.x),
  });
  if (error) return <p>{error.message}</p>;
  void room?.publish({ x: 1 }, { echo: false });
  // @ts-expect-error: the state has the room's type
  useRoom<{ color: string }>("board:8", { state: { colour: "teal" } });
  return <ul>{members.map((m) => <li key={m.user} style={{ color: m.conns[0]?.state.color }}>{m.user}</li>)}</ul>;
}
