// pushline-client: one API over WebSocket and Server-Sent Events for a Pushline server.
// Reconnects with exponential backoff and full jitter (honouring Retry-After where the
// transport shows it, and the server's SSE `retry:`), and resumes with the cursor each
// message carries, so an application loses nothing across a reconnect and is told
// plainly (`recovered: false`) when it could not be given everything. No dependencies:
// browsers have WebSocket and EventSource; in Node 20 pass implementations (`ws`,
// `eventsource`).

const DEFAULT_BACKOFF = { initial: 500, max: 30000 };

/** The states a client goes through. */
export const State = Object.freeze({
  Idle: "idle",
  Connecting: "connecting",
  Open: "open",
  Reconnecting: "reconnecting",
  Closed: "closed",
});

/** A delay drawn from [0, min(max, initial * 2^attempt)]: "full jitter". */
export function backoffDelay(attempt, { initial, max } = DEFAULT_BACKOFF, random = Math.random) {
  const ceiling = Math.min(max, initial * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** Bytes a uid keeps as they are where a topic pattern says `{sub}`. */
const KEPT_IN_TOPICS = /^[A-Za-z0-9\-_@~]$/;

/**
 * A uid as the server writes it where a topic pattern says `{sub}`: every UTF-8 byte but
 * ASCII letters, digits, `-`, `_`, `@` and `~` as `%XX`. `user.{sub}.inbox` for
 * `john.doe@example.com` is `"user." + topicSegment("john.doe@example.com") + ".inbox"`.
 */
export function topicSegment(uid) {
  let out = "";
  for (const byte of new TextEncoder().encode(uid)) {
    const ch = String.fromCharCode(byte);
    out += byte < 0x80 && KEPT_IN_TOPICS.test(ch) ? ch : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

/** Where a client is in its streams: `since` and the last position of each stream. */
export class Cursor {
  constructor(text) {
    this.since = null;
    this.positions = new Map();
    if (text) this.#parse(text);
  }

  #parse(text) {
    for (const part of text.split(",")) {
      if (part.startsWith("s") && this.since === null && !part.includes(":")) {
        this.since = part.slice(1);
        continue;
      }
      const [stream, epoch, offset] = part.split(":");
      if (stream && epoch && offset) this.positions.set(stream, { epoch, offset: Number(offset) });
    }
  }

  /** Takes one server message; true when it carried a position. */
  take(message) {
    if (message.type === "resumed") {
      if (message.since) this.since = message.since;
      // A position ahead of the stream (not one this server wrote) stands at the stream's
      // real top from now on, as the server's does; held, every later message would look
      // like one already seen.
      for (const entry of message.streams ?? []) {
        if (entry.reason === "cursor_ahead" && entry.epoch) this.positions.set(entry.stream, { epoch: entry.epoch, offset: entry.offset });
      }
    }
    if (message.stream && message.epoch && message.offset !== undefined) {
      this.positions.set(message.stream, { epoch: message.epoch, offset: message.offset });
      return true;
    }
    return false;
  }

  /** Whether a message was already seen (a duplicate) or skips offsets (a gap). */
  check(message) {
    const held = this.positions.get(message.stream);
    if (!held || held.epoch !== message.epoch) return "new";
    if (message.offset <= held.offset) return "duplicate";
    if (message.offset > held.offset + 1) return "gap";
    return "next";
  }

  toString() {
    if (this.since === null) return "";
    let text = `s${this.since}`;
    for (const [stream, { epoch, offset }] of this.positions) text += `,${stream}:${epoch}:${offset}`;
    return text;
  }
}

function httpToWs(base) {
  return base.replace(/^http/, "ws");
}

export class PushlineClient {
  #listeners = new Map();
  #topics;
  #socket = null;
  #source = null;
  #attempt = 0;
  #timer = null;
  #closed = false;
  #resuming = false;
  #transport;
  /** Publishes sent on the current socket and not yet answered, by `ref`. */
  #publishes = new Map();
  #nextRef = 0;

  /**
   * @param {string} url the server's base URL, `https://push.example` (or http://)
   * @param {object} options see index.d.ts
   */
  constructor(url, options = {}) {
    this.url = url.replace(/\/$/, "");
    this.options = { transport: "auto", backoff: DEFAULT_BACKOFF, ...options };
    this.#topics = new Set(options.topics ?? []);
    this.cursor = new Cursor(options.cursor);
    this.state = State.Idle;
    this.session = null;
    this.#transport = this.options.transport === "sse" ? "sse" : "websocket";
  }

  /** `type`: welcome, message, resumed, gap, error, state, refreshed, token_expired. */
  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  #emit(type, value) {
    for (const listener of this.#listeners.get(type) ?? []) {
      try {
        listener(value);
      } catch (error) {
        if (type !== "error") this.#emit("error", error);
      }
    }
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.#emit("state", state);
  }

  get topics() {
    return [...this.#topics];
  }

  get transport() {
    return this.#transport;
  }

  connect() {
    this.#closed = false;
    this.#open();
    return this;
  }

  close() {
    this.#closed = true;
    this.#abandonPublishes();
    clearTimeout(this.#timer);
    this.#socket?.close(1000, "client closed");
    this.#source?.close();
    this.#socket = this.#source = null;
    this.#setState(State.Closed);
  }

  subscribe(topics) {
    const fresh = topics.filter((t) => !this.#topics.has(t));
    fresh.forEach((t) => this.#topics.add(t));
    if (fresh.length === 0) return;
    if (this.#socket?.readyState === 1) this.#send({ type: "subscribe", topics: fresh });
    else if (this.#source) this.#reopen();
  }

  unsubscribe(topics) {
    const held = topics.filter((t) => this.#topics.delete(t));
    if (held.length === 0) return;
    if (this.#socket?.readyState === 1) this.#send({ type: "unsubscribe", topics: held });
    else if (this.#source) this.#reopen();
  }

  /**
   * Publishes `data` to `topic`, if the server lets this client (its token's `publish`
   * claim, or `--client-publish-topics`). Resolves with the `published` answer (its `id`);
   * rejects with the server's reason (`publish_failed`), or when the connection drops
   * before the answer came (the message may or may not have gone out). With `echo: true`
   * this client gets its own message too. WebSocket only.
   */
  publish(topic, data, { echo = false } = {}) {
    if (this.#socket?.readyState !== 1) return Promise.reject(new Error("not connected over WebSocket"));
    const ref = String(++this.#nextRef);
    return new Promise((resolve, reject) => {
      this.#publishes.set(ref, { resolve, reject });
      this.#send({ type: "publish", topic, data, echo, ref });
    });
  }

  #abandonPublishes() {
    for (const { reject } of this.#publishes.values()) reject(new Error("the connection closed before the publish was answered"));
    this.#publishes.clear();
  }

  async #token() {
    const { token } = this.options;
    return typeof token === "function" ? await token() : token;
  }

  async #query() {
    const query = new URLSearchParams();
    if (this.options.uid) query.set("uid", this.options.uid);
    const token = await this.#token();
    if (token) query.set("token", token);
    if (this.#topics.size) query.set("topics", [...this.#topics].join(","));
    const cursor = this.cursor.toString();
    this.#resuming = cursor !== "";
    if (this.#resuming) query.set("cursor", cursor);
    if (this.options.mailbox) query.set("mailbox", "1");
    return query.toString();
  }

  #send(value) {
    this.#socket.send(JSON.stringify(value));
  }

  async #open() {
    if (this.#closed) return;
    this.#setState(this.#attempt === 0 ? State.Connecting : State.Reconnecting);
    let query;
    try {
      query = await this.#query();
    } catch (error) {
      this.#emit("error", error);
      return this.#retry();
    }
    if (this.#closed) return;
    if (this.#transport === "websocket") this.#openWebSocket(query);
    else this.#openEventSource(query);
  }

  #openWebSocket(query) {
    const WebSocketImpl = this.options.WebSocket ?? globalThis.WebSocket;
    if (!WebSocketImpl) return this.#fallBack(new Error("no WebSocket implementation: pass one as `WebSocket`"));
    const socket = new WebSocketImpl(`${httpToWs(this.url)}/ws?${query}`);
    this.#socket = socket;
    let opened = false;
    let retryAfter = null;
    // `ws` (Node) shows the refused handshake; browsers do not.
    socket.on?.("unexpected-response", (_, response) => {
      const seconds = Number(response.headers["retry-after"]);
      if (seconds > 0) retryAfter = seconds * 1000;
    });
    socket.onopen = () => {
      opened = true;
    };
    socket.onmessage = (event) => this.#onMessage(JSON.parse(event.data));
    socket.onclose = () => {
      if (this.#socket !== socket) return;
      this.#socket = null;
      this.#abandonPublishes();
      if (this.#closed) return;
      if (!opened && this.options.transport === "auto" && this.session === null) return this.#fallBack(new Error("WebSocket did not open"));
      this.#retry(retryAfter);
    };
    socket.onerror = () => {};
  }

  /** WebSocket could not be opened (blocked by a proxy, say): SSE from now on. */
  #fallBack(error) {
    if (this.options.transport === "websocket") {
      this.#emit("error", error);
      return this.#retry();
    }
    this.#transport = "sse";
    this.#open();
  }

  #openEventSource(query) {
    const EventSourceImpl = this.options.EventSource ?? globalThis.EventSource;
    if (!EventSourceImpl) {
      this.#emit("error", new Error("no EventSource implementation: pass one as `EventSource`"));
      return this.#retry();
    }
    const source = new EventSourceImpl(`${this.url}/sse?${query}`, { withCredentials: !!this.options.withCredentials });
    this.#source = source;
    const handle = (event) => this.#onMessage(JSON.parse(event.data));
    for (const type of ["welcome", "message", "resumed", "gap"]) source.addEventListener(type, handle);
    source.onerror = () => {
      if (this.#source !== source) return;
      // CONNECTING: EventSource comes back on its own with Last-Event-ID (the cursor).
      if (source.readyState === 2) {
        this.#source = null;
        if (!this.#closed) this.#retry();
      } else {
        this.#setState(State.Reconnecting);
      }
    };
  }

  #reopen() {
    this.#source?.close();
    this.#source = null;
    this.#open();
  }

  #resume() {
    if (this.#socket) {
      const socket = this.#socket;
      this.#socket = null;
      this.#abandonPublishes();
      socket.onclose = null;
      socket.close();
      this.#retry();
    } else if (this.#source) {
      this.#reopen();
    }
  }

  #retry(after = null) {
    if (this.#closed) return;
    this.#setState(State.Reconnecting);
    const delay = after ?? backoffDelay(this.#attempt, this.options.backoff);
    this.#attempt += 1;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#open(), delay);
  }

  async #onMessage(message) {
    switch (message.type) {
      case "welcome":
        this.session = message.session;
        this.#attempt = 0;
        if (!this.#resuming) this.cursor.since = message.since;
        this.#setState(State.Open);
        this.#emit("welcome", message);
        break;
      case "message": {
        const seen = message.stream ? this.cursor.check(message) : "new";
        if (seen === "duplicate") return;
        this.cursor.take(message);
        this.#emit("message", message);
        break;
      }
      case "resumed":
        this.#resuming = false;
        this.cursor.take(message);
        this.#emit("resumed", message);
        break;
      case "token_expired":
        this.#emit("token_expired", message);
        try {
          const token = await this.#token();
          if (token && this.#socket?.readyState === 1) this.#send({ type: "refresh", token });
        } catch (error) {
          this.#emit("error", error);
        }
        break;
      case "gap":
        this.#emit("gap", message);
        // The node lost its link to Redis: what other nodes published meanwhile is only in
        // history. Reconnect, which resumes from the cursor.
        if (message.reason === "relay_lost") this.#resume();
        break;
      case "published":
      case "publish_failed": {
        const pending = this.#publishes.get(message.ref);
        if (!pending) break;
        this.#publishes.delete(message.ref);
        if (message.type === "published") pending.resolve(message);
        else pending.reject(Object.assign(new Error(message.error), { answer: message }));
        break;
      }
      case "error":
        this.#emit("error", new Error(message.error));
        break;
      default:
        this.#emit(message.type, message);
    }
  }
}
