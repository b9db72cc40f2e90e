// React bindings for the pg-ws-gateway client: a provider for the connection, and hooks that
// keep a component in step with a topic's rows or a presence topic's users. A separate entry
// point (pg-ws-gateway/react), so the core script stays small and free of dependencies.
import { createContext, createElement, useCallback, useContext, useEffect, useRef, useState, useSyncExternalStore } from "react";

const Context = createContext(null);
const NO_USERS = { users: new Map(), error: null };

/** Makes `gateway` (from connect()) the one the hooks below use. */
export function GatewayProvider({ gateway, children }) {
  return createElement(Context.Provider, { value: gateway }, children);
}

/** The gateway given, else the nearest GatewayProvider's. */
export function useGateway(gateway) {
  const provided = useContext(Context);
  const gw = gateway || provided;
  if (!gw) throw new Error("pg-ws-gateway/react: no gateway: render inside <GatewayProvider gateway={connect(...)}> or pass { gateway }");
  return gw;
}

/** The connection's state ("connecting", "open", "reconnecting", "closed"), re-rendering as it changes. */
export function useConnectionState(gateway) {
  const gw = useGateway(gateway);
  const subscribe = useCallback((changed) => gw.onState(changed), [gw]);
  const get = () => gw.state;
  return useSyncExternalStore(subscribe, get, get);
}

const NO_EVENTS = [];

function initial(rows) {
  return {
    rows: rows instanceof Map ? new Map(rows) : new Map(Array.isArray(rows) ? rows : Object.entries(rows || {})),
    events: NO_EVENTS,
    subscribed: false,
    position: null,
    error: null,
    notRecovered: null,
  };
}

function applyEvent(v, e, keep) {
  let rows = v.rows;
  if (e.op !== "message") {
    rows = new Map(rows);
    if (e.op === "delete") rows.delete(e.key);
    else rows.set(e.key, e.row);
  }
  const events = keep > 0 ? [...v.events, e].slice(-keep) : NO_EVENTS;
  return { ...v, rows, events, position: { pos: e.pos, epoch: e.epoch } };
}

// The client takes one subscription per topic and connection, and two components showing the
// same topic is common: hooks on the same topic share one (gateway -> topic -> shared view).
// The first hook starts it (with its rows and since); the last one to leave ends it.
// `start(s, update)` subscribes and returns the unsubscribe function; `update(change, call)`
// changes the shared view, renders every hook, and calls `call` with each hook's options.
const shared = new WeakMap();

function join(gw, topic, hook, view, start) {
  let topics = shared.get(gw);
  if (!topics) shared.set(gw, (topics = new Map()));
  let s = topics.get(topic);
  if (!s) {
    s = { view, hooks: new Set() };
    const update = (change, call) => {
      s.view = change(s.view);
      for (const h of s.hooks) {
        h.render(s.view);
        if (call) call(h.options);
      }
    };
    // throws on a closed connection, or a topic the application subscribed to itself
    s.off = start(s, update);
    topics.set(topic, s);
  }
  s.hooks.add(hook);
  hook.render(s.view);
  return () => {
    s.hooks.delete(hook);
    if (!s.hooks.size) {
      topics.delete(topic);
      s.off();
    }
  };
}

function subscribeTopic(gw, topic, o) {
  return (s, update) => {
    // the most events any of the topic's hooks keeps
    const keep = () => Math.max(0, ...[...s.hooks].map((h) => h.options.limit ?? 100));
    return gw.subscribe(topic, (e) => update((v) => applyEvent(v, e, keep()), (ho) => ho.onEvent?.(e)), {
      since: o.since,
      onSubscribed: (info) => update((v) => ({ ...v, subscribed: true, error: null, position: { pos: info.pos, epoch: info.epoch } })),
      onNotRecovered: (info) => update((v) => ({ ...v, notRecovered: info }), (ho) => ho.onNotRecovered?.(info)),
      onError: (error) => update((v) => ({ ...v, error, subscribed: v.subscribed && !!error.willRetry }), (ho) => ho.onError?.(error)),
    });
  };
}

/**
 * Subscribes to `topic` while the component is mounted (none while `topic` is null).
 * `rows`: the topic's rows by key, starting from `options.rows` (a snapshot your API returned
 * with the position `options.since`), then kept current: insert and update set, delete removes.
 * `events`: the last `options.limit` events (default 100), oldest first. A new `topic` or
 * `since` starts over. Hooks on the same topic and connection share one subscription.
 */
export function useTopic(topic, options = {}) {
  const gw = useGateway(options.gateway);
  const state = useConnectionState(gw);
  const [view, setView] = useState(() => initial(options.rows));
  // This hook as the shared subscription sees it; its options as last rendered, so a new
  // callback each render does not resubscribe.
  const hook = useRef({ render: setView }).current;
  hook.options = options;
  const since = options.since;
  useEffect(() => {
    if (topic == null) {
      setView(initial());
      return;
    }
    const o = hook.options;
    try {
      return join(gw, topic, hook, initial(o.rows), subscribeTopic(gw, topic, o));
    } catch (error) {
      setView({ ...initial(o.rows), error });
    }
  }, [gw, topic, since && since.pos, since && since.epoch]);
  const limit = options.limit ?? 100;
  const events = view.events.length <= limit ? view.events : limit > 0 ? view.events.slice(-limit) : NO_EVENTS;
  return { ...view, events, state };
}

/**
 * Who is on the presence topic `topic` (none while it is null): `users` maps user id to entry.
 * Hooks on the same topic and connection share one subscription.
 */
export function usePresence(topic, options = {}) {
  const gw = useGateway(options.gateway);
  const state = useConnectionState(gw);
  const [view, setView] = useState(NO_USERS);
  const hook = useRef({ render: setView }).current;
  hook.options = options;
  useEffect(() => {
    setView(NO_USERS);
    if (topic == null) return;
    try {
      return join(gw, topic, hook, NO_USERS, (s, update) => {
        const users = (_, map) => update(() => ({ users: new Map(map), error: null }));
        const error = (err) => update((v) => ({ ...v, error: err }));
        return gw.presence(topic, { onSnapshot: users, onChange: users, onError: error });
      });
    } catch (error) {
      setView({ ...NO_USERS, error });
    }
  }, [gw, topic]);
  return { ...view, state };
}

const NO_MEMBERS = { members: [], error: null };

/**
 * The room `topic` while the component is mounted (none while `topic` is null): `members`, one
 * entry per user with each connection's state, kept current; `room` to publish with. When
 * `options.state` is given this connection tracks it in the room (again whenever its JSON
 * changes; `null` untracks). `options.onMessage` gets the room's messages. Needs the rooms
 * module: `import "pg-ws-gateway/rooms"` once, anywhere. One room per topic and connection.
 */
export function useRoom(topic, options = {}) {
  const gw = useGateway(options.gateway);
  const state = useConnectionState(gw);
  const [view, setView] = useState(NO_MEMBERS);
  const [room, setRoom] = useState(null);
  // the options as last rendered: a new onMessage each render does not enter again
  const latest = useRef(options);
  latest.current = options;
  useEffect(() => {
    setView(NO_MEMBERS);
    if (topic == null) return;
    if (typeof gw.room !== "function") {
      setView({ ...NO_MEMBERS, error: new Error('pg-ws-gateway/react: useRoom needs the rooms module: import "pg-ws-gateway/rooms"') });
      return;
    }
    let r;
    try {
      r = gw.room(topic, { onError: (error) => setView((v) => ({ ...v, error })) });
    } catch (error) {
      setView({ ...NO_MEMBERS, error });
      return;
    }
    r.onSync((members) => setView({ members, error: null }));
    r.onMessage((m) => latest.current.onMessage?.(m));
    setRoom(r);
    return () => {
      r.leave();
      setRoom(null);
    };
  }, [gw, topic]);
  const tracked = options.state === undefined ? undefined : JSON.stringify(options.state);
  useEffect(() => {
    if (!room || tracked === undefined) return;
    const done = tracked === "null" ? room.untrack() : room.track(JSON.parse(tracked));
    done.catch((error) => setView((v) => ({ ...v, error })));
  }, [room, tracked]);
  return { ...view, room, state };
}
