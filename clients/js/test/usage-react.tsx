// A typed use of pg-ws-gateway/react in components (tsc -p test checks it with React's types).
import { connect } from "pg-ws-gateway";
import { GatewayProvider, useConnectionState, usePresence, useTopic } from "pg-ws-gateway/react";

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
