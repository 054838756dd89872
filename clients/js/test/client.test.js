// The client against the real server: messages over WebSocket, resume across a dropped
// network with nothing lost, a server killed and restarted (reconnect, topics restored,
// `recovered: false` surfaced), SSE as the fallback, and a token refreshed on expiry.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import WebSocket from "ws";
import { EventSource } from "eventsource";

import { PushlineClient, Cursor, backoffDelay, State, topicSegment } from "../src/index.js";
import { freePort, startServer, startRedis, proxy, publish, next } from "../harness.js";

const fast = { initial: 50, max: 200 };

test("topicSegment escapes a uid as the server does where a pattern says {sub}", () => {
  // The same cases as the server's unit test (server/src/rights.rs).
  assert.equal(topicSegment("john.doe@example.com"), "john%2Edoe@example%2Ecom");
  assert.equal(topicSegment("a*{sub}%,\u007fä-_~"), "a%2A%7Bsub%7D%25%2C%7F%C3%A4-_~");
  assert.equal(topicSegment("alice"), "alice");
});

test("backoff is full jitter under a cap", () => {
  assert.equal(backoffDelay(0, { initial: 100, max: 1000 }, () => 0.999), 99);
  assert.equal(backoffDelay(10, { initial: 100, max: 1000 }, () => 0.5), 500);
  assert.equal(backoffDelay(3, { initial: 100, max: 1000 }, () => 0), 0);
});

test("a cursor round-trips and tells duplicates and gaps", () => {
  const cursor = new Cursor("s1700,t.00000000000000aa:0000000b:4,b:0000000c:2");
  assert.equal(cursor.since, "1700");
  assert.equal(cursor.toString(), "s1700,t.00000000000000aa:0000000b:4,b:0000000c:2");
  assert.equal(cursor.check({ stream: "b", epoch: "0000000c", offset: 2 }), "duplicate");
  assert.equal(cursor.check({ stream: "b", epoch: "0000000c", offset: 3 }), "next");
  assert.equal(cursor.check({ stream: "b", epoch: "0000000c", offset: 5 }), "gap");
  assert.equal(cursor.check({ stream: "b", epoch: "0000000d", offset: 1 }), "new");
});

test("a client whose cursor is ahead of a stream gets every later message of it", async () => {
  const server = await startServer(await freePort());
  try {
    // The stream's epoch and top, from a client that reads it.
    const probe = new PushlineClient(server.url, { uid: "probe", topics: ["news"], WebSocket });
    const message = next(probe, "message");
    probe.connect();
    await next(probe, "welcome");
    await publish(server.url, { topic: "news", data: { n: 1 } });
    const { stream, epoch, offset } = await message;
    probe.close();
    // A position 1000 past the top, in the stream's own epoch (a cursor restored from elsewhere).
    const client = new PushlineClient(server.url, { uid: "ada", topics: ["news"], WebSocket, cursor: `s${Date.now()},${stream}:${epoch}:${offset + 1000}` });
    const resumed = next(client, "resumed");
    client.connect();
    const entry = (await resumed).streams.find((s) => s.stream === stream);
    assert.equal(entry.reason, "cursor_ahead");
    const seen = [];
    client.on("message", (m) => seen.push(m.data.n));
    const last = next(client, "message", (m) => m.data.n === 4);
    for (let n = 2; n <= 4; n++) await publish(server.url, { topic: "news", data: { n } });
    await last;
    assert.deepEqual(seen, [2, 3, 4]);
    client.close();
  } finally {
    await server.stop();
  }
});

test("messages arrive over WebSocket, and a dropped network loses none of them", async () => {
  const server = await startServer(await freePort());
  const network = await proxy(new URL(server.url).port);
  const client = new PushlineClient(network.url, { uid: "ada", topics: ["news"], WebSocket, backoff: fast });
  const welcome = next(client, "welcome");
  client.connect();
  try {
    await welcome;
    assert.equal(client.transport, "websocket");
    const seen = [];
    client.on("message", (m) => seen.push(m.data.n));
    const third = next(client, "message", (m) => m.data.n === 2);
    for (let n = 0; n < 3; n++) await publish(server.url, { topic: "news", data: { n } });
    await third;

    const reconnecting = next(client, "state", (s) => s === State.Reconnecting);
    const resumed = next(client, "resumed");
    network.cut();
    await reconnecting;
    for (let n = 3; n < 8; n++) await publish(server.url, { topic: "news", data: { n } });
    assert.equal((await resumed).recovered, true);
    const last = next(client, "message", (m) => m.data.n === 8);
    await publish(server.url, { topic: "news", data: { n: 8 } });
    await last;
    assert.deepEqual(seen, [0, 1, 2, 3, 4, 5, 6, 7, 8], "every message once, in order");
  } finally {
    client.close();
    await network.close();
    await server.stop();
  }
});

test("a killed and restarted server: the client comes back, its topics restored, and is told what it lost", async () => {
  const port = await freePort();
  let server = await startServer(port);
  const client = new PushlineClient(server.url, { uid: "bo", topics: ["a"], WebSocket, backoff: fast });
  const welcome = next(client, "welcome");
  client.connect();
  try {
    await welcome;
    client.subscribe(["b"]);
    await next(client, "subscribed");
    const before = next(client, "message", (m) => m.data === "before");
    await publish(server.url, { topic: "b", data: "before" });
    await before;

    const reconnecting = next(client, "state", (s) => s === State.Reconnecting);
    const resumed = next(client, "resumed");
    await server.stop();
    await reconnecting;
    server = await startServer(port);
    assert.equal((await resumed).recovered, false, "the history went with the process, and the client is told");
    const after = next(client, "message", (m) => m.data === "after");
    await publish(server.url, { topic: "b", data: "after" });
    assert.equal((await after).topic, "b", "the topic subscribed later is restored");
  } finally {
    client.close();
    await server.stop();
  }
});

test("a node whose link to Redis drops tells the client, which resumes and loses nothing", async () => {
  const redis = await startRedis(await freePort());
  const link = await proxy(new URL(redis.url).port);
  const redisVia = (url) => ["--registry", "redis", "--redis-url", url.replace("http:", "redis:"), "--history-size", "1000"];
  const a = await startServer(await freePort(), redisVia(link.url));
  const b = await startServer(await freePort(), redisVia(redis.url));
  const client = new PushlineClient(a.url, { uid: "cy", topics: ["news"], WebSocket, backoff: fast });
  const welcome = next(client, "welcome");
  client.connect();
  try {
    await welcome;
    const seen = [];
    client.on("message", (m) => seen.push(m.data.n));
    // Until node A has told Redis it listens to the topic, the topic keeps no history:
    // publish until a message comes with its place in the stream.
    for (;;) {
      const arrived = next(client, "message", (m) => m.data.n === 0);
      await publish(b.url, { topic: "news", data: { n: 0 } });
      if ((await arrived).stream) break;
    }
    const gap = next(client, "gap");
    const resumed = next(client, "resumed");
    link.cut();
    for (let n = 1; n < 6; n++) await publish(b.url, { topic: "news", data: { n } });
    assert.equal((await gap).reason, "relay_lost");
    assert.equal((await resumed).recovered, true);
    const last = next(client, "message", (m) => m.data.n === 6);
    await publish(b.url, { topic: "news", data: { n: 6 } });
    await last;
    assert.deepEqual(seen.filter((n) => n !== 0), [1, 2, 3, 4, 5, 6], "every message once, in order");
  } finally {
    client.close();
    await Promise.all([a.stop(), b.stop(), redis.stop()]);
    link.cut();
    await link.close();
  }
});

test("SSE takes over when WebSocket cannot open", async () => {
  const server = await startServer(await freePort());
  // A WebSocket that never opens, as behind a proxy that drops upgrades.
  class Blocked {
    constructor() {
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code: 1006 }), 10);
    }
    close() {}
  }
  const client = new PushlineClient(server.url, { uid: "cy", topics: ["news"], WebSocket: Blocked, EventSource, backoff: fast });
  const welcome = next(client, "welcome");
  client.connect();
  try {
    await welcome;
    assert.equal(client.transport, "sse");
    const got = next(client, "message");
    await publish(server.url, { topic: "news", data: "via sse" });
    assert.equal((await got).data, "via sse");
    assert.ok(client.cursor.toString().startsWith("s"), "the cursor is kept on SSE too");
  } finally {
    client.close();
    await server.stop();
  }
});

const SECRET = "a secret of at least thirty-two bytes, for tests";

function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

test("an expiring token is supplied again and the connection stays", async () => {
  const server = await startServer(await freePort(), ["--jwt-secret", SECRET, "--api-key", SECRET, "--token-refresh-grace", "10s"]);
  let issued = 0;
  const token = () => {
    issued += 1;
    return jwt({ sub: "di", exp: Math.floor(Date.now() / 1000) + (issued === 1 ? 1 : 3600) });
  };
  const client = new PushlineClient(server.url, { token, WebSocket, backoff: fast });
  const expired = next(client, "token_expired", () => true, 15000);
  const refreshed_ = next(client, "refreshed", () => true, 15000);
  client.connect();
  try {
    await expired;
    const refreshed = await refreshed_;
    assert.ok(refreshed.expires_at > Date.now() / 1000 + 60);
    assert.equal(issued, 2);
    assert.equal(client.state, State.Open);
  } finally {
    client.close();
    await server.stop();
  }
});

test("a client publishes to a topic: the answer resolves, other clients get it, a refusal rejects", async () => {
  const server = await startServer(await freePort(), ["--client-publish-topics", "chat.*"]);
  const ada = new PushlineClient(server.url, { uid: "ada", topics: ["chat.room"], WebSocket, backoff: fast });
  const bob = new PushlineClient(server.url, { uid: "bob", topics: ["chat.room"], WebSocket, backoff: fast });
  const welcomes = [next(ada, "welcome"), next(bob, "welcome")];
  ada.connect();
  bob.connect();
  try {
    await Promise.all(welcomes);
    const adaSeen = [];
    ada.on("message", (m) => adaSeen.push(m.data));
    const arrived = next(bob, "message");
    const answer = await ada.publish("chat.room", { text: "hi" });
    assert.equal(answer.type, "published");
    const got = await arrived;
    assert.deepEqual([got.id, got.data], [answer.id, { text: "hi" }]);
    await assert.rejects(ada.publish("secret", 1), /not allowed to publish to topic `secret`/);
    const echoed = next(ada, "message");
    await ada.publish("chat.room", "mine", { echo: true });
    assert.equal((await echoed).data, "mine");
    assert.deepEqual(adaSeen, ["mine"], "its own message only when it asked");
  } finally {
    ada.close();
    bob.close();
    await server.stop();
  }
});
