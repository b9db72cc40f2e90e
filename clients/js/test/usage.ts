// A typed use of the core client, as a frontend project writes it: `tsc -p test` must accept
// it, and reject each line marked @ts-expect-error (so the types do constrain).
import PgGateway, {
  connect,
  RECONNECT_AFTER,
  type CloseCode,
  type ErrorCode,
  type Gateway,
  type GatewayError,
  type GatewayEvent,
  type PresenceEntry,
} from "pg-ws-gateway";

interface Item {
  id: number;
  title: string;
}

const gw: Gateway = connect("wss://gateway.example.com/ws", {
  token: async () => (await fetch("/api/realtime-token")).text(),
  onState: (state, detail) => {
    if (state === "open") console.log(detail.user?.toUpperCase(), detail.conn);
    if (state === "reconnecting") console.log(`retry in ${detail.delay} ms after ${detail.code}`);
    if (state === "closed") console.log(detail.code, detail.reason);
  },
  onError: (err: GatewayError) => console.warn(err.code, err.message),
});
connect({ token: "a.b.c", autoAway: false });
connect(new URL("wss://gateway.example.com/ws"), { token: () => "a.b.c" });
PgGateway.connect({ token: "a.b.c" }).close();

const unsubscribe = gw.subscribe<Item>(
  "user:42",
  (event: GatewayEvent<Item>) => {
    if (event.op === "insert" || event.op === "update") console.log(event.key, event.row.title);
    else if (event.op === "delete") console.log(event.table, event.key);
    else console.log(event.data);
  },
  {
    since: { pos: 41, epoch: "3f2a9c1e" },
    onSubscribed: (info) => console.log(info.pos, info.recovered, info.replayed),
    onNotRecovered: () => location.reload(),
    onError: (err) => {
      const code: ErrorCode = err.code;
      if (code === "forbidden" || code === "closed") console.warn(err.topic, err.closeCode);
    },
  },
);
unsubscribe();

const who = gw.presence("presence:global", {
  onSnapshot: (list: PresenceEntry[], users) => console.log(list.length, users.size),
  onChange: (change) => console.log(change.user, change.status === "offline" ? "left" : change.status),
});
console.log([...who.users.values()].map((u) => u.last_seen));
who();

const off = gw.onState((state) => console.log(state));
off();
gw.setStatus("away");
const codes: readonly CloseCode[] = RECONNECT_AFTER;
console.log(codes, gw.state, gw.user);

// @ts-expect-error: a token is required
connect({});
// @ts-expect-error: presence topics start with "presence:"
gw.presence("room:1");
// @ts-expect-error: statuses are "online" and "away"
gw.setStatus("busy");
gw.subscribe("user:42", (event) => {
  // @ts-expect-error: a delete has no row
  if (event.op === "delete") console.log(event.row);
});
// @ts-expect-error: not a state
connect({ token: "t", onState: (state) => state === "ready" });

// Publishing: a promise of the acknowledgment, with the position of a durable message.
gw.publish("room:7", { x: 10, y: 20 }, { echo: false }).catch((err: GatewayError) => console.warn(err.code));
void gw.publish("room:7", { text: "hi" }, { durable: true }).then((ack) => console.log(ack.pos, ack.epoch));
// @ts-expect-error: durable is a boolean
void gw.publish("room:7", 1, { durable: "yes" });
gw.subscribe("room:8", () => {}, { onMessage: (m) => console.log(m.from, m.conn, m.data) });
