export declare const State: Readonly<{
  Idle: "idle";
  Connecting: "connecting";
  Open: "open";
  Reconnecting: "reconnecting";
  Closed: "closed";
}>;
export type ClientState = (typeof State)[keyof typeof State];

export interface Backoff {
  /** First delay's ceiling, ms. */
  initial: number;
  /** Largest delay's ceiling, ms. */
  max: number;
}

/** A uid as the server writes it where a topic pattern says `{sub}` (percent-escaped). */
export declare function topicSegment(uid: string): string;
export declare function backoffDelay(attempt: number, backoff?: Backoff, random?: () => number): number;

export interface Position {
  epoch: string;
  offset: number;
}

/** Where a client is in its streams; `toString()` is what `?cursor=` takes. */
export declare class Cursor {
  constructor(text?: string);
  since: string | null;
  positions: Map<string, Position>;
  take(message: ServerMessage): boolean;
  check(message: PushMessage): "new" | "next" | "duplicate" | "gap";
  toString(): string;
}

export interface Welcome {
  type: "welcome";
  session: string;
  uid: string;
  since: string;
}

export interface PushMessage<T = unknown> {
  type: "message";
  id: string;
  topic: string | null;
  data: T;
  /** Absent where the server keeps no history for the stream. */
  stream?: string;
  epoch?: string;
  offset?: number;
}

export interface StreamResume {
  stream: string;
  replayed: number;
  recovered: boolean;
  epoch?: string;
  offset?: number;
  reason?: "epoch_changed" | "trimmed" | "unknown" | "not_kept" | "cursor_ahead";
  lost_after?: Position;
}

export interface Resumed {
  type: "resumed";
  /** False: some messages could not be given; refetch those streams' state. */
  recovered: boolean;
  since: string;
  streams: StreamResume[];
}

export interface Gap {
  type: "gap";
  stream?: string;
  epoch?: string;
  from?: number;
  to?: number;
  count?: number;
}

export type ServerMessage = Welcome | PushMessage | Resumed | Gap | { type: string; [key: string]: unknown };

export interface ClientOptions {
  /** Open mode only: who this client is. */
  uid?: string;
  /** A JWT, or a function giving one (called at each connect and when it expires). */
  token?: string | (() => string | Promise<string>);
  topics?: string[];
  /** "auto" (default): WebSocket, SSE when WebSocket cannot open. */
  transport?: "auto" | "websocket" | "sse";
  /** A cursor kept from an earlier run (`client.cursor.toString()`), to resume from. */
  cursor?: string;
  /** Also give the uid's stored pushes (its offline mailbox). */
  mailbox?: boolean;
  backoff?: Backoff;
  /** SSE: send cookies (the server must list this page's origin). */
  withCredentials?: boolean;
  /** In Node 20: `import WebSocket from "ws"`. */
  WebSocket?: unknown;
  /** In Node 20: `import { EventSource } from "eventsource"`. */
  EventSource?: unknown;
}

export interface Events {
  welcome: Welcome;
  message: PushMessage;
  resumed: Resumed;
  gap: Gap;
  error: Error;
  state: ClientState;
  refreshed: { type: "refreshed"; expires_at: number; revoked: string[] };
  token_expired: { type: "token_expired"; grace_ms: number };
  join: { type: "join"; topic: string; uid: string; info?: unknown };
  leave: { type: "leave"; topic: string; uid: string };
  presence_diff: { type: "presence_diff"; topic: string; joined: { uid: string; info?: unknown }[]; left: string[]; members: number };
  presence_count: { type: "presence_count"; topic: string; members: number; joined: number; left: number };
}

/** The answer to a publish the server took. */
export interface Published {
  type: "published";
  id: string;
  topic: string;
  ref: string;
}

export declare class PushlineClient {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  readonly session: string | null;
  readonly cursor: Cursor;
  readonly topics: string[];
  readonly transport: "websocket" | "sse";
  on<K extends keyof Events>(type: K, listener: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (value: Events[K]) => void): void;
  connect(): this;
  close(): void;
  subscribe(topics: string[]): void;
  unsubscribe(topics: string[]): void;
  /** Rejects with the server's reason (`publish_failed`), or when the connection drops first. */
  publish(topic: string, data: unknown, options?: { echo?: boolean }): Promise<Published>;
}
