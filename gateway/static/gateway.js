/*
 * pg-ws-gateway browser client, no dependencies: a classic <script> defines window.PgGateway,
 * gateway.mjs re-exports it. The token goes in the first frame, never in the URL (access logs).
 * After each "welcome" every topic is subscribed again from the last {pos, epoch} seen, so the
 * server replays what was missed, or answers "recovered": false and the application reloads.
 * Dropped sockets are retried with full-jitter backoff. Wire protocol: gateway/protocol.py.
 */
// Also published as the npm package pg-ws-gateway, with its types and React hooks: clients/js/
// (`npm pack` copies this file there; edit it here). The block comment above is served, these
// line comments are not (the gateway strips whole-line // comments), so notes go in them.
(function (root) {
  "use strict";

  // RECONNECT_AFTER in gateway/protocol.py. Its other codes (FINAL) mean "do not come back as
  // you are"; other closes (1006 network drop, a proxy's) are retried.
  const RECONNECT_AFTER = [1001, 1012, 1013, 4004, 4005, 4008, 4011, 4029];
  const FINAL = { 1000: "closed", 1002: "protocol error", 1007: "not UTF-8", 1009: "frame too big", 4001: "unauthorized", 4010: "disconnected" };
  // Subscribe errors that may clear up; any other (forbidden, bad_topic...) is final.
  const RETRYABLE = ["unavailable", "rate_limited"];

  // first retry within 0.5 s, doubling up to 20 s (no reconnect storms)
  const BACKOFF_MS = 500;
  const BACKOFF_CAP_MS = 20000;
  // a connection that stayed up this long resets the backoff
  const STABLE_MS = 10000;
  // no welcome by then: the socket is stuck, try again
  const HANDSHAKE_MS = 10000;
  // below the idle timeout of common proxies (often 30-60 s)
  const PING_MS = 25000;
  // Subscribes go out at most at GATEWAY_SUBSCRIBE_RATE's default (10 a second, bursts of 20),
  // as the gateway accepts them. Sent all at once (an application's 100 topics, or every topic
  // again after a reconnect), most would be dropped by its frame rate, their retries dropped
  // again, and the client closed 4029 for flooding, then again after every reconnect.
  const SUBSCRIBE_STEP_MS = 100;
  const SUBSCRIBE_BURST = 20;

  function fail(code, message, extra) {
    return Object.assign(new Error(message), { code }, extra);
  }

  // An application callback's exception must not break our bookkeeping; rethrown later, it
  // still reaches the console.
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

  function backoff(attempt) {
    return Math.round(Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_MS * 2 ** attempt));
  }

  // "wss://h/ws", "/ws", "https://h/ws" or nothing (this page's host) -> an absolute ws(s) URL.
  function socketUrl(url) {
    // "gateway.example.com/ws", "localhost:8080/ws": a host without its scheme, not a path of this page
    if (/^[\w-]+((\.[\w-]+)+(:\d+)?|:\d+)(\/|$)/.test(url)) throw new TypeError(`PgGateway.connect: url ${JSON.stringify(url)} has no scheme: write "wss://${url}"`);
    let u;
    try {
      u = new URL(url || "/ws", root.location && root.location.href);
    } catch (err) {
      throw new TypeError(`PgGateway.connect: url ${JSON.stringify(url)} is not a valid URL`);
    }
    u.protocol = u.protocol.replace(/^http/, "ws");
    if (!/^wss?:$/.test(u.protocol)) throw new TypeError(`PgGateway.connect: url must be ws(s): or http(s):, got ${u.protocol}`);
    return u.href;
  }

  class Gateway {
    constructor(url, options) {
      this.url = socketUrl(url);
      this.options = options;
      this.state = "idle";
      // topic -> subscription
      this._subs = new Map();
      // unsubscribe id -> topic, until the server confirms it
      this._unsubs = new Map();
      // request id -> [resolve, reject] of its promise (publish, and the rooms module's track)
      this._acks = new Map();
      this._timers = {};
      this._nextId = 1;
      this._attempt = 0;
      // bumped when a connection ends: stale async work is ignored
      this._generation = 0;
      // what the application asked for
      this._status = "online";
      // listeners added with onState(), besides options.onState
      this._listeners = new Set();
      this._onVisibility = () => {
        this._syncStatus();
        // Back in view: mobile browsers and background tabs kill sockets, and the backoff may
        // be 20 s away. Try within a second instead; the jitter keeps a fleet of tabs, shown
        // again together (a laptop waking), from arriving at once. Offline, `online` will.
        if (this.state === "reconnecting" && root.document.visibilityState === "visible" && root.navigator.onLine !== false) {
          this._timer("retry", () => this._connect(), Math.random() * 1000);
        }
      };
      this._onOnline = () => this.state === "reconnecting" && this._connect();
      if (root.document) root.document.addEventListener("visibilitychange", this._onVisibility);
      if (root.addEventListener) root.addEventListener("online", this._onOnline);
      this._connect();
    }

    subscribe(topic, onEvent, opts = {}) {
      if (typeof onEvent !== "function") throw new TypeError(`subscribe(${JSON.stringify(topic)}): onEvent must be a function`);
      if (String(topic).startsWith("presence:")) throw new TypeError(`subscribe: use presence() for ${topic}`);
      const since = opts.since;
      if (since != null && !(Number.isInteger(since.pos) && since.pos >= 0 && typeof since.epoch === "string")) {
        throw new TypeError(`subscribe(${JSON.stringify(topic)}): since must be {pos: integer >= 0, epoch: string}`);
      }
      return this._add({ topic, onEvent, opts, pos: since ? since.pos : null, epoch: since ? since.epoch : null });
    }

    presence(topic, opts = {}) {
      if (!String(topic).startsWith("presence:")) throw new TypeError(`presence: topic must start with "presence:", got ${JSON.stringify(topic)}`);
      return this._add({ topic, opts, presence: true, users: new Map() });
    }

    // Resolves with the "published" frame (with pos when durable, sent once committed), rejects
    // with the error frame's code. Not queued while disconnected: a cursor position sent late is
    // wrong, and whether to send a durable message again is the application's call.
    publish(topic, data, opts = {}) {
      return this._request({ type: "publish", topic, data, durable: !!opts.durable, echo: opts.echo !== false });
    }

    // A frame the server answers with one frame carrying its id: a promise of that answer.
    _request(f) {
      return new Promise((ok, no) => {
        if (!this._ready) return no(fail("disconnected", "not connected"));
        this._acks.set((f.id = this._nextId++), [ok, no]);
        this._send(f);
      });
    }

    setStatus(status) {
      if (status !== "online" && status !== "away") throw new TypeError(`setStatus: status must be "online" or "away", got ${JSON.stringify(status)}`);
      this._status = status;
      this._syncStatus();
    }

    close() {
      if (this.state !== "closed") this._finish(1000, "closed by the application", true);
    }

    // Another onState listener (a UI framework's bindings, say); returns the function removing it.
    onState(fn) {
      this._listeners.add(fn);
      return () => this._listeners.delete(fn);
    }

    _add(sub) {
      const topic = sub.topic;
      if (typeof topic !== "string" || !topic) throw new TypeError(`topic must be a non-empty string, got ${JSON.stringify(topic)}`);
      if (this.state === "closed") throw new Error(`cannot subscribe to ${topic}: the connection is closed`);
      if (this._subs.has(topic)) throw new Error(`already subscribed to ${topic}; call its unsubscribe function first`);
      sub.retries = 0;
      this._subs.set(topic, sub);
      // While an unsubscribe of the topic is unconfirmed the server still has the old
      // subscription and would refuse this one (already_subscribed): send it once confirmed.
      if (this._ready && !this._unsubbing(topic)) this._sendSubscribe(sub);
      const unsubscribe = () => this._remove(sub);
      // presence: user -> {user, status, last_seen}, kept current
      unsubscribe.users = sub.users;
      return unsubscribe;
    }

    _remove(sub, again) {
      // already gone: calling twice is harmless
      if (!again && this._subs.get(sub.topic) !== sub) return;
      this._subs.delete(sub.topic);
      clearTimeout(sub.timer);
      if (this._ready && sub.id != null) this._sendUnsubscribe(sub.topic);
    }

    _sendUnsubscribe(topic) {
      const id = this._nextId++;
      this._unsubs.set(id, topic);
      this._send({ type: "unsubscribe", topic, id });
    }

    _unsubbing(topic) {
      for (const t of this._unsubs.values()) if (t === topic) return true;
      return false;
    }

    // An unsubscribe is over (done, or the server no longer had it): a subscription made
    // meanwhile can go out now.
    _unsubscribed(id) {
      const topic = this._unsubs.get(id);
      this._unsubs.delete(id);
      const sub = this._subs.get(topic);
      if (this._ready && sub && sub.id == null && !sub.timer && !this._unsubbing(topic)) this._sendSubscribe(sub);
    }

    _sendSubscribe(sub) {
      const wait = this._subscribeSlot();
      if (wait > 0) {
        // Not sent yet: no id, so an unsubscribe meanwhile sends nothing and just cancels it.
        sub.id = null;
        sub.timer = setTimeout(() => {
          sub.timer = null;
          if (this._ready) this._subscribeNow(sub);
        }, wait);
        return;
      }
      this._subscribeNow(sub);
    }

    // Reserves the next subscribe slot (a token bucket kept as the time it is next full,
    // reset at each welcome); returns how many ms until that slot.
    // Counted on the monotonic clock: the wall clock set back an hour held the next subscribe an hour.
    _subscribeSlot() {
      const now = performance.now();
      const at = Math.max(this._subscribeAt || 0, now);
      this._subscribeAt = at + SUBSCRIBE_STEP_MS;
      return Math.max(0, at - now - (SUBSCRIBE_BURST - 1) * SUBSCRIBE_STEP_MS);
    }

    _subscribeNow(sub) {
      sub.id = this._nextId++;
      const frame = { type: "subscribe", topic: sub.topic, id: sub.id };
      if (sub.pos != null && sub.epoch) frame.since = { pos: sub.pos, epoch: sub.epoch };
      sub.resumed = !!frame.since;
      this._send(frame);
    }

    // Frames for a topic still being unsubscribed belong to the old subscription.
    _live(topic, presence) {
      const sub = this._subs.get(topic);
      return !sub || !sub.presence !== !presence || this._unsubbing(topic) ? null : sub;
    }

    async _connect() {
      this._clear("retry");
      const gen = ++this._generation;
      this._setState("connecting", { attempt: this._attempt });
      let token;
      try {
        token = await this._token();
      } catch (err) {
        if (gen !== this._generation) return;
        this._report(fail("token", `could not get a token: ${err.message}`, { cause: err }));
        return this._retry(0, "no token");
      }
      // close() was called while the token came
      if (gen !== this._generation) return;
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        return this._finish(1006, `cannot open ${this.url}: ${err.message}`);
      }
      // Closed at birth: the page's Content-Security-Policy refused the URL (Chromium fires an
      // error event, never a close event). Retrying cannot help; the page's policy must change.
      if (ws.readyState === 3) return this._finish(1006, `this page's Content-Security-Policy blocks ${this.url}: add it to connect-src`);
      this._ws = ws;
      ws.onopen = () => {
        // A hidden tab authenticates away: starting online would publish its user online, then away.
        this._sentStatus = this._wantStatus();
        this._send(this._sentStatus === "online" ? { type: "auth", token } : { type: "auth", token, status: "away" });
      };
      ws.onmessage = (m) => this._frame(m.data);
      ws.onclose = (e) => this._dropped(e.code, e.reason);
      this._timer("handshake", () => this._dropped(1006, "no welcome from the server"), HANDSHAKE_MS);
    }

    _frame(data) {
      let f;
      try {
        f = JSON.parse(data);
      } catch (err) {
        return this._report(fail("bad_frame", `frame is not JSON: ${String(data).slice(0, 80)}`));
      }
      // any frame proves the socket is alive
      this._heardAt = Date.now();
      const ack = this._acks.get(f.id);
      if (ack) {
        this._acks.delete(f.id);
        return f.type === "error" ? ack[1](fail(f.code, f.message, f)) : ack[0](f);
      }
      switch (f.type) {
        case "welcome": return this._welcome(f);
        case "refreshed": return this._scheduleRefresh(f);
        case "subscribed": return this._subscribed(f);
        case "unsubscribed": return this._unsubscribed(f.id);
        case "event": return this._event(f);
        case "presence": return this._presence(f);
        case "message": return this._message(f);
        case "error": return this._error(f);
      }
    }

    _welcome(f) {
      this._clear("handshake");
      this.user = f.user;
      this.conn = f.conn;
      this._ready = true;
      this._upAt = Date.now();
      this._pingAt = 0;
      // the page's visibility may have changed since auth; before the presence snapshot
      this._syncStatus();
      // a new connection: the gateway's bucket is full again
      this._subscribeAt = 0;
      for (const sub of this._subs.values()) this._sendSubscribe(sub);
      this._scheduleRefresh(f);
      this._timer("ping", () => this._ping(), PING_MS);
      this._setState("open", { user: f.user, conn: f.conn });
    }

    _ping() {
      if (!(this._heardAt > this._pingAt)) return this._dropped(1006, "no answer to ping");
      this._pingAt = Date.now();
      this._send({ type: "ping", id: this._nextId++ });
      this._timer("ping", () => this._ping(), PING_MS);
    }

    _subscribed(f) {
      // No id: sent unasked on a live stream whose missed positions are gone (reload).
      const sub = f.id == null ? this._live(f.topic, false) || this._live(f.topic, true) : this._subs.get(f.topic);
      // the answer to a subscription since cancelled
      if (!sub || (f.id != null && sub.id !== f.id)) return;
      sub.retries = 0;
      if (sub.presence && f.recovered === false) {
        // Changes after the snapshot were lost, so the map is wrong: subscribe again for a fresh
        // snapshot (the subscribe goes out once the unsubscribe is confirmed, see _unsubscribed).
        sub.id = null;
        return this._sendUnsubscribe(sub.topic);
      }
      if (!sub.presence) {
        sub.pos = f.pos;
        sub.epoch = f.epoch;
      }
      const info = { topic: f.topic, epoch: f.epoch, pos: f.pos, recovered: f.recovered, replayed: f.replayed || 0 };
      if ((sub.resumed || f.id == null) && f.recovered === false) call(sub.opts.onNotRecovered, info);
      if (f.id != null) call(sub.opts.onSubscribed, info);
    }

    _event(f) {
      const sub = this._live(f.topic, false);
      if (!sub) return;
      // seen already
      if (f.epoch === sub.epoch && sub.pos != null && f.pos <= sub.pos) return;
      const reset = sub.epoch != null && f.epoch !== sub.epoch;
      sub.pos = f.pos;
      sub.epoch = f.epoch;
      // A new stream under a live subscription: what came before it is lost.
      if (reset) call(sub.opts.onNotRecovered, { topic: f.topic, epoch: f.epoch, pos: f.pos, recovered: false });
      call(sub.onEvent, f);
    }

    // An ephemeral message (no position, never replayed) on a subscribed topic.
    _message(f) {
      const sub = this._live(f.topic, false);
      if (sub) call(sub.opts.onMessage, f);
    }

    _presence(f) {
      const sub = this._live(f.topic, true);
      if (!sub) return;
      // a room's presence (gateway-rooms.js): members with their state, not statuses
      if (sub.frame) return sub.frame(f);
      const users = sub.users;
      const put = (e) => (e.status === "offline" ? users.delete(e.user) : users.set(e.user, e));
      if (f.snapshot) {
        users.clear();
        f.snapshot.forEach(put);
        call(sub.opts.onSnapshot, f.snapshot, users);
      }
      if (f.change) {
        put(f.change);
        call(sub.opts.onChange, f.change, users);
      }
    }

    _error(f) {
      const err = fail(f.code, f.message, f);
      const unsub = this._unsubs.get(f.id);
      if (unsub != null) {
        // Dropped, not done: send it again. It stays pending meanwhile, so the old
        // subscription's frames are ignored and a new subscription to the topic waits.
        if (f.code === "rate_limited") {
          return setTimeout(() => {
            if (this._unsubs.delete(f.id) && this._ready) this._sendUnsubscribe(unsub);
          }, 1000);
        }
        // else: unsubscribing what the server no longer had
        return this._unsubscribed(f.id);
      }
      // The token function now answers for another user (the application switched accounts):
      // this connection and its subscriptions are the old user's. Reconnect, as the new user
      // (docs/protocol.md), rather than stream the old user's topics until its token expires.
      if (f.code === "token_user_changed") {
        this._report(err);
        return this._dropped(null, "the token is for another user: reconnecting as that user");
      }
      // A frame without id was refused: a refresh (bad token, or dropped) or a status (dropped).
      // Only a refresh still unanswered is tried again, while the old token lasts; a status is
      // sent again a second later, whichever it was (once more is harmless).
      if (f.id == null && f.topic == null) {
        if (this._refreshing && (f.code === "bad_token" || f.code === "rate_limited")) this._timer("refresh", () => this._refresh(), 5000);
        if (f.code === "rate_limited") setTimeout(() => { this._sentStatus = null; this._syncStatus(); }, 1000);
      }
      const sub = f.topic != null && this._subs.get(f.topic);
      // No id on "forbidden" (a refreshed token no longer grants the topic) or "removed" (the
      // application's server took the user out): the server dropped the subscription.
      if (!sub || (f.id == null ? !["forbidden", "removed"].includes(f.code) : sub.id !== f.id)) return this._report(err);
      if (RETRYABLE.includes(f.code)) {
        err.willRetry = true;
        // At least a second, plus jitter: clamped instead, every retry landed at the same moment.
        sub.timer = setTimeout(() => this._ready && this._sendSubscribe(sub), 1000 + backoff(++sub.retries));
      } else {
        this._subs.delete(sub.topic);
      }
      call(sub.opts.onError || this.options.onError, err);
    }

    // Refresh in-band at 80% of the token's life left or 30 s before its end, whichever is
    // earlier. A fixed string cannot be refreshed: the server closes (4005), we reconnect.
    _scheduleRefresh(f) {
      this._clear("refresh");
      this._refreshing = false;
      if (!f.expires || typeof this.options.token !== "function") return;
      // expires_in counts by the gateway's clock: this browser's may be minutes off.
      const left = f.expires_in >= 0 ? f.expires_in * 1000 : f.expires * 1000 - Date.now();
      // at least 1 s (a skewed clock must not spin), yet within a short token's life
      const delay = Math.max(Math.max(1000, Math.min(5000, left / 2)), Math.min(left * 0.8, left - 30000));
      // setTimeout overflows at 2^31 ms
      this._timer("refresh", () => this._refresh(), Math.min(delay, 2e9));
    }

    async _refresh() {
      const gen = this._generation;
      try {
        const token = await this._token();
        if (gen === this._generation) {
          this._send({ type: "refresh", token });
          this._refreshing = true;
        }
      } catch (err) {
        this._report(fail("token", `could not refresh the token: ${err.message}`, { cause: err }));
        if (gen === this._generation) this._timer("refresh", () => this._refresh(), 5000);
      }
    }

    _wantStatus() {
      const hidden = this.options.autoAway !== false && root.document && root.document.visibilityState === "hidden";
      return hidden ? "away" : this._status;
    }

    _syncStatus() {
      const want = this._wantStatus();
      if (this._ready && want !== this._sentStatus) {
        this._sentStatus = want;
        this._send({ type: "status", status: want });
      }
    }

    // The socket closed (or is stuck): retry, unless the code says retrying cannot help.
    _dropped(code, reason) {
      if (this._upAt && Date.now() - this._upAt >= STABLE_MS) this._attempt = 0;
      this._teardown();
      if (FINAL[code]) return this._finish(code, reason || FINAL[code]);
      // a replica is draining for a deploy: another one takes over now
      if (code === 1012) this._attempt = 0;
      this._retry(code, reason);
    }

    _retry(code, reason) {
      const delay = backoff(this._attempt++);
      this._timer("retry", () => this._connect(), delay);
      this._setState("reconnecting", { delay, code, reason, attempt: this._attempt });
    }

    _teardown() {
      this._generation++;
      const ws = this._ws;
      this._ws = null;
      this._ready = false;
      this._upAt = 0;
      this._unsubs.clear();
      // Their answers died with the socket: a durable publish may or may not have been stored.
      for (const [, no] of this._acks.values()) no(fail("disconnected", "connection lost"));
      this._acks.clear();
      for (const name of ["handshake", "ping", "refresh"]) this._clear(name);
      for (const sub of this._subs.values()) clearTimeout(sub.timer);
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = null;
        if (ws.readyState < 2) ws.close(1000);
      }
    }

    _finish(code, reason, byApplication) {
      this._teardown();
      this._clear("retry");
      if (root.document) root.document.removeEventListener("visibilitychange", this._onVisibility);
      if (root.removeEventListener) root.removeEventListener("online", this._onOnline);
      this._setState("closed", { code, reason });
      if (byApplication) return;
      const err = fail("closed", `connection closed for good (${code}): ${reason}`, { closeCode: code, reason });
      this._report(err);
      for (const sub of this._subs.values()) call(sub.opts.onError, err);
    }

    async _token() {
      const t = this.options.token;
      // A token request that never settles (browsers never time out a fetch) must not stall us.
      // Armed only for a function: with a string nothing would await it, and a rejection nobody
      // awaits is an uncaught error in the page's console (and its error tracker).
      const token = typeof t === "function" ? await Promise.race([t(), new Promise((_, no) => setTimeout(() => no(new Error("no answer in time")), HANDSHAKE_MS))]) : t;
      if (typeof token !== "string" || !token) throw new TypeError(`options.token gave ${typeof token}, not a non-empty string`);
      return token;
    }

    _send(frame) {
      if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(frame));
    }

    _setState(state, detail) {
      this.state = state;
      call(this.options.onState, state, detail);
      for (const fn of this._listeners) call(fn, state, detail);
    }

    // Errors no subscription owns go to options.onError, or the console: never lost.
    _report(err) {
      if (this.options.onError) call(this.options.onError, err);
      else if (root.console) root.console.warn("PgGateway:", err.message);
    }

    _timer(name, fn, ms) {
      this._clear(name);
      this._timers[name] = setTimeout(fn, ms);
    }

    _clear(name) {
      clearTimeout(this._timers[name]);
    }
  }

  function connect(url, options) {
    // connect({ token })
    // connect(new URL(...), options) is not connect(options)
    if (url && typeof url === "object" && !options) [url, options] = [undefined, url];
    options = options || {};
    const t = options.token;
    if (!(typeof t === "function" || (typeof t === "string" && t))) {
      throw new TypeError("PgGateway.connect: options.token must be a non-empty string or a function returning one");
    }
    return new Gateway(url, options);
  }

  root.PgGateway = { connect, Gateway, RECONNECT_AFTER };
})(typeof globalThis !== "undefined" ? globalThis : this);
