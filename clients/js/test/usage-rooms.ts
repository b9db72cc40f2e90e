// Rooms (pg-ws-gateway/rooms): importing the module gives every Gateway its room() method.
import { connect } from "pg-ws-gateway";
import "pg-ws-gateway/rooms";
import type { Room, RoomMember } from "pg-ws-gateway/rooms";

interface Viewer {
  name: string;
  color: string;
}

const gw = connect({ token: "a.b.c" });
const room: Room<Viewer, { x: number; y: number }> = gw.room<Viewer, { x: number; y: number }>("board:7", {
  onEvent: (e) => console.log(e.pos),
  onError: (err) => console.warn(err.code),
});
void room.track({ name: "Ada", color: "teal" });
room.onSync((members: RoomMember<Viewer>[]) => console.log(members.map((m) => m.conns[0]?.state.color)));
room.onJoin((p) => console.log(p.user, p.conn, p.state.name));
room.onLeave((p) => console.log(p.user, "left"));
room.onUpdate((p, before) => console.log(p.state.color, before.state.color));
const off = room.onMessage((m) => {
  if (m.type === "message") console.log(m.from, m.data.x);
  else console.log(m.pos, m.data.y);
});
off();
void room.publish({ x: 1, y: 2 });
// @ts-expect-error: the message's data has the room's type
void room.publish({ x: "1" });
void room.untrack();
room.leave();
