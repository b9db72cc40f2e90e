// React bindings for the pg-ws-gateway client: a provider for the connection, and hooks that
// keep a component in step with a topic's rows or a presence topic's users. A separate entry
// point (pg-ws-gateway/react), so the core script stays small and free of dependencies.
import { createContext, createElement, useCallback, useContext, useEffect, useRef, useState, useSyncExternalStore } from "react";

const Context = createContext(null);
const NONE = new Map();

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

function initial(rows) {
  return {
    rows: rows instanceof Map ? new Map(rows) : new Map(Array.isArray(rows) ? rows : Object.entries(rows || {})),
    events: [],
    subscribed: false,
    position: null,
    error: null,
    notRecovered: null,
  };
}

/**
 * Subscribes to `topic` while the component is mounted (none while `topic` is null).
 * `rows`: the topic's rows by key, starting from `options.rows` (a snapshot your API returned
 * with the position `options.since`), then kept current: insert and update set, delete removes.
 * `events`: the last `options.limit` events (default 100), oldest first. A new `topic` or
 * `since` starts over.
 */
export function useTopic(topic, options = {}) {
  const gw = useGateway(options.gateway);
  const state = useConnectionState(gw);
  const [view, setView] = useState(() => initial(options.rows));
  // The callbacks and rows as last rendered: a new function each render must not resubscribe.
  const latest = useRef(options);
  latest.current = options;
  const since = options.since;
  useEffect(() => {
    const o = latest.current;
    setView(initial(o.rows));
    if (topic == null) return;
    const limit = o.limit ?? 100;
    const onEvent = (e) => {
      setView((v) => {
        let rows = v.rows;
        if (e.op !== "message") {
          rows = new Map(rows);
          if (e.op === "delete") rows.delete(e.key);
          else rows.set(e.key, e.row);
        }
        const events = limit > 0 ? [...v.events, e].slice(-limit) : v.events;
        return { ...v, rows, events, position: { pos: e.pos, epoch: e.epoch } };
      });
      latest.current.onEvent?.(e);
    };
    try {
      return gw.subscribe(topic, onEvent, {
        since: o.since,
        onSubscribed: (info) => setView((v) => ({ ...v, subscribed: true, error: null, position: { pos: info.pos, epoch: info.epoch } })),
        onNotRecovered: (info) => {
          setView((v) => ({ ...v, notRecovered: info }));
          latest.current.onNotRecovered?.(info);
        },
        onError: (error) => {
          setView((v) => ({ ...v, error, subscribed: v.subscribed && !!error.willRetry }));
          latest.current.onError?.(error);
        },
      });
    } catch (error) {
      // already subscribed elsewhere on this connection, a closed connection, a bad topic
      setView((v) => ({ ...v, error }));
    }
  }, [gw, topic, since && since.pos, since && since.epoch]);
  return { ...view, state };
}

/** Who is on the presence topic `topic` (none while it is null): `users` maps user id to entry. */
export function usePresence(topic, options = {}) {
  const gw = useGateway(options.gateway);
  const state = useConnectionState(gw);
  const [view, setView] = useState({ users: NONE, error: null });
  useEffect(() => {
    setView({ users: NONE, error: null });
    if (topic == null) return;
    const update = (_, users) => setView({ users: new Map(users), error: null });
    try {
      return gw.presence(topic, { onSnapshot: update, onChange: update, onError: (error) => setView((v) => ({ ...v, error })) });
    } catch (error) {
      setView((v) => ({ ...v, error }));
    }
  }, [gw, topic]);
  return { ...view, state };
}
