/* pg-ws-gateway rooms: gw.room(topic). Load after gateway.js. */
// gw.room(topic) joins a room: who is in it with their state (presence on "presence:<topic>"),
// the messages published to it, and this tab's own state (track), restored by itself after a
// reconnect. A separate script so that pages without rooms do not download it: the core client stays
// under 5 KB gzipped (tests/test_client_script.py). Served without whole-line // comments, like
// gateway.js; edit it here (clients/js/prepack.mjs copies it into the npm package).
(function (root) {
  "use strict";

  const PgGateway = root.PgGateway;
  if (!PgGateway) throw new Error("gateway-rooms.js: load gateway.js first");

  class Room {
    constructor(gw, topic, opts) {
      this.gateway = gw;
      this.topic = topic;
      // conn -> {user, conn, state}: one entry per connection (a user with two tabs has two)
      this.conns = new Map();
      // what this connection tracks (null: nothing); sent again after every reconnect
      this.tracked = null;
      // kind ("sync", "join", "leave", "update", "message") -> its listeners
      this._on = {};
      const emit = (kind, ...args) => (this._on[kind] || []).forEach((fn) => call(fn, ...args));
      this._emit = emit;
      // The room's topic: its ephemeral messages, and its events (rows, durable messages) from
      // where the application says (opts.since), resumed across reconnects like any subscription.
      this._off = gw.subscribe(
        topic,
        (e) => {
          call(opts.onEvent, e);
          if (e.op === "message") emit("message", e);
        },
        Object.assign({}, opts, { onMessage: (m) => emit("message", m) }),
      );
      // Its presence: a snapshot of the members at each subscribe, then one change at a time.
      const presence = { topic: `presence:${topic}`, opts: { onError: opts.onError }, presence: true, frame: (f) => this._presence(f) };
      try {
        this._offPresence = gw._add(presence);
      } catch (err) {
        this._off();
        throw err;
      }
      // after each welcome (the subscriptions are already sent again): track again
      this._offState = gw.onState((state) => {
        if (state !== "open") return;
        if (this.tracked) this._send("track").catch((err) => call(opts.onError || gw.options.onError, err));
      });
    }

    // Every member, one entry per user: [{user, conns: [{conn, state}]}], sorted by user.
    get members() {
      const users = new Map();
      for (const { user, conn, state } of this.conns.values()) {
        if (!users.has(user)) users.set(user, { user, conns: [] });
        users.get(user).conns.push({ conn, state });
      }
      return [...users.values()].sort((a, b) => a.user.localeCompare(b.user));
    }

    // Join (or update this connection's state in) the room's presence. Resolves with the
    // "tracked" frame once the gateway confirms; while disconnected, with null at once: the state
    // is sent when the connection is back (an error then goes to onError).
    track(state) {
      if (!state || typeof state !== "object" || Array.isArray(state)) throw new TypeError("track(state): state must be an object");
      this.tracked = state;
      return this._send("track");
    }

    // Leave the room's presence (the subscriptions stay: this tab still sees and hears it).
    untrack() {
      const was = this.tracked;
      this.tracked = null;
      return was ? this._send("untrack") : Promise.resolve(null);
    }

    // Send a message to everyone in the room (gw.publish on the room's topic).
    publish(data, opts) {
      return this.gateway.publish(this.topic, data, opts);
    }

    // Listeners; each returns the function removing it.
    // onSync(members): the member list changed (after a snapshot and after every change)
    onSync(fn) { return this._listen("sync", fn); }
    // onJoin({user, conn, state}): a connection joined (every member, at the first snapshot)
    onJoin(fn) { return this._listen("join", fn); }
    // onLeave({user, conn, state}): a connection left (untracked, closed, or its replica died)
    onLeave(fn) { return this._listen("leave", fn); }
    // onUpdate({user, conn, state}, before): a connection tracked a new state
    onUpdate(fn) { return this._listen("update", fn); }
    // onMessage(m): {type: "message", from, conn, data} (ephemeral), or a durable message's
    // event {type: "event", op: "message", from, data, pos, epoch}
    onMessage(fn) { return this._listen("message", fn); }

    // Leave for good: untrack, end both subscriptions.
    leave() {
      this.untrack().catch(() => {});
      this._offState();
      this._off();
      this._offPresence();
    }

    _listen(kind, fn) {
      if (typeof fn !== "function") throw new TypeError(`room ${kind} listener: not a function`);
      const set = (this._on[kind] ||= new Set()).add(fn);
      return () => set.delete(fn);
    }

    _send(type) {
      const f = { type, topic: this.topic };
      if (type === "track") f.state = this.tracked;
      return this.gateway._ready ? this.gateway._request(f) : Promise.resolve(null);
    }

    _presence(f) {
      const conns = this.conns;
      const emit = this._emit;
      if (f.members) {
        // A snapshot (at subscribe, or again after a reconnect): who left or came meanwhile.
        const next = new Map();
        for (const m of f.members) for (const c of m.conns) next.set(c.conn, { user: m.user, conn: c.conn, state: c.state });
        this.conns = next;
        for (const [conn, e] of conns) if (!next.has(conn)) emit("leave", e);
        for (const [conn, e] of next) if (!conns.has(conn)) emit("join", e);
      } else if (f.change) {
        const { op, user, conn, state } = f.change;
        const before = conns.get(conn);
        if (op === "leave") {
          if (!before) return;
          conns.delete(conn);
          emit("leave", before);
        } else {
          const e = { user, conn, state };
          conns.set(conn, e);
          if (before) emit("update", e, before);
          else emit("join", e);
        }
      } else return;
      emit("sync", this.members);
    }
  }

  function call(fn, ...args) {
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (err) {
      setTimeout(() => {
        throw err;
      });
    }
  }

  // One room per topic and connection; the room's options as subscribe's (since, onEvent,
  // onSubscribed, onNotRecovered, onError).
  PgGateway.Gateway.prototype.room = function (topic, opts = {}) {
    return new Room(this, topic, opts);
  };
  PgGateway.Room = Room;
})(typeof globalThis !== "undefined" ? globalThis : this);
