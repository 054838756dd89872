// The Pusher Channels protocol, spoken by clients no one here wrote: pusher-js (the
// browser and Node client) connects, subscribes to public and private channels, sends and
// receives client events; the `pusher` server library triggers events and batches through
// the signed HTTP API, and a request with a wrong signature, a stale timestamp or a changed
// body is refused.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, createHmac } from "node:crypto";
import Pusher from "pusher-js";
import PusherServer from "pusher";
import WebSocket from "ws";

import { freePort, startServer, startRedis } from "../harness.js";

const APP = { appId: "42", key: "app-key", secret: "app-secret-of-sixteen-bytes" };

async function pusherServer(args = []) {
  const port = await freePort();
  const server = await startServer(port, ["--pusher-app", `${APP.appId}:${APP.key}:${APP.secret}`, ...args]);
  const api = new PusherServer({ ...APP, host: "127.0.0.1", port: String(port), useTLS: false });
  return { server, port, api };
}

/** A pusher-js client whose private channels are authorized by the server library. */
function client(port, api, key = APP.key) {
  return new Pusher(key, {
    cluster: "local",
    wsHost: "127.0.0.1",
    wsPort: port,
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => callback(null, api.authorizeChannel(socketId, channelName)),
    },
  });
}

function once(target, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    target.bind(event, function handler(data) {
      clearTimeout(timer);
      target.unbind(event, handler);
      resolve(data);
    });
  });
}

function connected(pusher) {
  return new Promise((resolve, reject) => {
    pusher.connection.bind("connected", () => resolve(pusher.connection.socket_id));
    pusher.connection.bind("failed", () => reject(new Error("connection failed")));
  });
}

/** The states `pusher` goes through from now on. */
function statesOf(pusher) {
  const states = [];
  pusher.connection.bind("state_change", ({ current }) => states.push(current));
  return states;
}

/** Triggers `tick` on `channel` every `every` ms for `ms`: a channel busy enough that its
 * pusher-js clients, hearing it, never ping on their own. */
async function keepBusy(api, channel, ms, every) {
  const started = Date.now();
  for (let n = 0; Date.now() - started < ms; n++) {
    await api.trigger(channel, "tick", { n });
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}

test("pusher-js receives what the pusher library triggers on a public channel, once each", async () => {
  const { server, port, api } = await pusherServer();
  const pusher = client(port, api);
  try {
    const socketId = await connected(pusher);
    assert.match(socketId, /^\d+\.\d+$/);
    const channel = pusher.subscribe("news");
    await once(channel, "pusher:subscription_succeeded");
    const got = once(channel, "greet");
    const response = await api.trigger("news", "greet", { hello: "world" });
    assert.equal(response.status, 200);
    assert.deepEqual(await got, { hello: "world" });
    const batch = once(channel, "second");
    await api.triggerBatch([
      { channel: "elsewhere", name: "first", data: { n: 1 } },
      { channel: "news", name: "second", data: { n: 2 } },
    ]);
    assert.deepEqual(await batch, { n: 2 });
  } finally {
    pusher.disconnect();
    await server.stop();
  }
});

test("private channels need the app's signature; client events reach the others, not the sender", async () => {
  const { server, port, api } = await pusherServer(["--pusher-client-events"]);
  const [alice, bob] = [client(port, api), client(port, api)];
  try {
    const [aliceId] = await Promise.all([connected(alice), connected(bob)]);
    const [a, b] = [alice.subscribe("private-room"), bob.subscribe("private-room")];
    await Promise.all([once(a, "pusher:subscription_succeeded"), once(b, "pusher:subscription_succeeded")]);

    let aliceGotHerOwn = false;
    a.bind("client-typing", () => (aliceGotHerOwn = true));
    const typing = once(b, "client-typing");
    assert.ok(a.trigger("client-typing", { who: "alice" }));
    assert.deepEqual(await typing, { who: "alice" });

    // Excluding alice's socket: bob gets it, and then the next event shows alice got neither.
    const toBob = once(b, "note");
    await api.trigger("private-room", "note", "for bob", { socket_id: aliceId });
    assert.equal(await toBob, "for bob");
    const both = once(a, "after");
    await api.trigger("private-room", "after", "all");
    assert.equal(await both, "all");
    assert.equal(aliceGotHerOwn, false, "a client event is not sent back to its sender");

    // A forged authorization is refused on that channel alone.
    const forger = new Pusher(APP.key, {
      cluster: "local", wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"], disableStats: true,
      channelAuthorization: { customHandler: (_params, callback) => callback(null, { auth: `${APP.key}:${"0".repeat(64)}` }) },
    });
    try {
      await connected(forger);
      const refused = once(forger.subscribe("private-room"), "pusher:subscription_error");
      assert.equal((await refused).status, 401);
    } finally {
      forger.disconnect();
    }
  } finally {
    alice.disconnect();
    bob.disconnect();
    await server.stop();
  }
});

test("an unknown app key is refused with the protocol's 4001, and pusher-js does not retry", async () => {
  const { server, port, api } = await pusherServer();
  const pusher = client(port, api, "no-such-key");
  const states = [];
  pusher.connection.bind("state_change", ({ current }) => states.push(current));
  const disconnected = once(pusher.connection, "disconnected");
  try {
    // During the handshake pusher-js wraps the server's pusher:error.
    const error = await once(pusher.connection, "error");
    assert.equal(error.error.data.code, 4001);
    assert.match(error.error.data.message, /no-such-key/);
    await disconnected;
    // A refusal (4000-4099) is not retried: a retry would be `connecting` again within
    // pusher-js's first backoff (1 s).
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.deepEqual(states, ["disconnected"], "no `connecting` after the refusal");
  } finally {
    pusher.disconnect();
    await server.stop();
  }
});

test("the HTTP API refuses a wrong signature, a stale timestamp and a changed body, saying which", async () => {
  const { server, port } = await pusherServer();
  try {
    const body = JSON.stringify({ name: "e", channel: "news", data: "{}" });
    const md5 = (text) => createHash("md5").update(text).digest("hex");
    const send = async ({ timestamp = Math.floor(Date.now() / 1000), secret = APP.secret, sentBody = body } = {}) => {
      const path = `/apps/${APP.appId}/events`;
      const query = `auth_key=${APP.key}&auth_timestamp=${timestamp}&auth_version=1.0&body_md5=${md5(body)}`;
      const signature = createHmac("sha256", secret).update(`POST\n${path}\n${query}`).digest("hex");
      const response = await fetch(`http://127.0.0.1:${port}${path}?${query}&auth_signature=${signature}`, {
        method: "POST", headers: { "content-type": "application/json" }, body: sentBody,
      });
      return { status: response.status, text: await response.text() };
    };
    assert.equal((await send()).status, 200);
    const wrong = await send({ secret: "not-the-apps-secret" });
    assert.equal(wrong.status, 401);
    assert.match(wrong.text, /Invalid signature/);
    const stale = await send({ timestamp: Math.floor(Date.now() / 1000) - 3600 });
    assert.equal(stale.status, 401);
    assert.match(stale.text, /Timestamp expired/);
    const changed = await send({ sentBody: body.replace("news", "other") });
    assert.equal(changed.status, 401);
    assert.match(changed.text, /body_md5/);

    // A user id percent-encoded in the path, as some libraries send it, is the id.
    const terminate = async (user) => {
      const path = `/apps/${APP.appId}/users/${user}/terminate_connections`;
      const query = `auth_key=${APP.key}&auth_timestamp=${Math.floor(Date.now() / 1000)}&auth_version=1.0`;
      const signature = createHmac("sha256", APP.secret).update(`POST\n${path}\n${query}`).digest("hex");
      return (await fetch(`http://127.0.0.1:${port}${path}?${query}&auth_signature=${signature}`, { method: "POST" })).status;
    };
    assert.deepEqual([await terminate("al@ice"), await terminate(encodeURIComponent("al@ice;x=1"))], [200, 200]);

    // An unsigned request is refused on its head: its body is never waited for, nor held
    // against the node's budget for bodies being read.
    const { connect } = await import("node:net");
    const socket = connect(port, "127.0.0.1");
    const answered = new Promise((resolve) => {
      let text = "";
      socket.on("data", (chunk) => (text += chunk));
      socket.on("close", () => resolve(text));
    });
    socket.write(`POST /apps/${APP.appId}/events?auth_key=${APP.key} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n{`);
    const reading = async () => Number((await (await fetch(`${server.admin}/metrics`)).text()).match(/^pushline_publish_bytes_reading (\d+)/m)?.[1]);
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("no answer before the body")), 3000));
    const answer = await Promise.race([answered, timeout.catch(async (e) => { throw new Error(`${e.message}; bytes reading: ${await reading()}`); })]);
    assert.match(answer, /^HTTP\/1.1 401/);
    assert.equal(await reading(), 0);
  } finally {
    await server.stop();
  }
});

test("pusher-js subscribing 25 channels at once stays connected; activity_timeout follows --idle-timeout; the native API cannot reach Pusher clients", async () => {
  const { server, port, api } = await pusherServer(["--idle-timeout", "20s"]);
  const pusher = client(port, api);
  const states = statesOf(pusher);
  try {
    const socketId = await connected(pusher);
    assert.equal(pusher.connection.activityTimeout, 10000, "half of --idle-timeout, so its pings come in time");
    const channels = Array.from({ length: 25 }, (_, i) => pusher.subscribe(`news-${i}`));
    await Promise.all(channels.map((c) => once(c, "pusher:subscription_succeeded")));
    assert.deepEqual(states, ["connected"], "no reconnect: a burst of subscribes is not a command flood");

    const post = async (path, body) => {
      const response = await fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", body: JSON.stringify(body) });
      return { status: response.status, body: await response.json() };
    };
    const pushed = await post("/v1/push", { uids: [`pusher:${socketId}`], data: "native" });
    assert.equal(pushed.status, 400, JSON.stringify(pushed.body));
    const broadcast = await post("/v1/broadcast", { data: "native" });
    assert.equal(broadcast.body.delivered, 0, "a broadcast reaches native clients only");
    const published = await post("/v1/publish", { topic: `pusher:${APP.appId}:news-0`, data: "native" });
    assert.equal(published.status, 400);
    // And the channel still works through the Pusher API.
    const got = once(channels[0], "still");
    await api.trigger("news-0", "still", "here");
    assert.equal(await got, "here");
  } finally {
    pusher.disconnect();
    await server.stop();
  }
});

test("pusher-js keeps its connection when channels are refused, is pinged on a busy channel past --idle-timeout, and --presence-topics never makes it a member", async () => {
  // activity_timeout 2 s; `*` would match every Pusher channel if native patterns reached them.
  const { server, port, api } = await pusherServer(["--idle-timeout", "4s", "--presence-topics", "*"]);
  const refused = new Pusher(APP.key, {
    cluster: "local", wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"], disableStats: true,
    channelAuthorization: { customHandler: (_, callback) => callback(null, { auth: `${APP.key}:${"0".repeat(64)}` }) },
  });
  const other = client(port, api);
  const states = statesOf(refused);
  const heard = { refused: [], other: [] };
  refused.connection.bind("message", (m) => heard.refused.push(m.event));
  other.connection.bind("message", (m) => heard.other.push(m.event));
  try {
    await Promise.all([connected(refused), connected(other)]);
    // More refusals than --max-commands-per-second (20): they are topic changes.
    const privates = Array.from({ length: 30 }, (_, i) => refused.subscribe(`private-lapsed-${i}`));
    await Promise.all(privates.map((c) => once(c, "pusher:subscription_error")));
    const busy = [refused.subscribe("busy"), other.subscribe("busy")];
    await Promise.all(busy.map((c) => once(c, "pusher:subscription_succeeded")));

    let got = 0;
    busy[0].bind("tick", () => got++);
    await keepBusy(api, "busy", 6000, 250);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.deepEqual(states.filter((s) => s !== "connecting"), ["connected"], `no reconnect; states: ${states}`);
    assert.ok(heard.refused.includes("pusher:ping"), "the server pinged the client it heard nothing from");
    assert.ok(got >= 20, `every event arrived on the one connection (${got})`);
    const member = (events) => events.filter((e) => e.startsWith("pusher_internal:member_"));
    assert.deepEqual(member(heard.refused), [], "a public channel has no members");
    assert.deepEqual(member(heard.other), [], "a public channel has no members");
    const metrics = await (await fetch(`${server.admin}/metrics`)).text();
    assert.doesNotMatch(metrics, /pushline_connections_closed_total\{[^}]*reason="idle_timeout"[^}]*\} [1-9]/);
  } finally {
    refused.disconnect();
    other.disconnect();
    await server.stop();
  }
});

test("below 2 s of --idle-timeout a busy pusher-js client is still pinged in time", async () => {
  const { server, port, api } = await pusherServer(["--idle-timeout", "1s"]);
  const pusher = client(port, api);
  const states = statesOf(pusher);
  try {
    await connected(pusher);
    await once(pusher.subscribe("busy"), "pusher:subscription_succeeded");
    await keepBusy(api, "busy", 3000, 100);
    assert.deepEqual(states.filter((s) => s !== "connecting"), ["connected"], `no reconnect; states: ${states}`);
  } finally {
    pusher.disconnect();
    await server.stop();
  }
});

/** A pusher-js client joining presence channels as `user`. */
function member(port, api, user) {
  return new Pusher(APP.key, {
    cluster: "local", wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"],
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, api.authorizeChannel(socketId, channelName, { user_id: user, user_info: { name: user.toUpperCase() } })),
    },
  });
}

test("presence channels: pusher-js sees the members, who joins and who leaves, once per user; client events carry the sender", async () => {
  const { server, port, api } = await pusherServer(["--pusher-client-events", "--presence-batch", "20ms"]);
  const alice = member(port, api, "alice");
  const bobs = [member(port, api, "bob"), member(port, api, "bob")];
  try {
    const room = alice.subscribe("presence-room");
    const ok = await once(room, "pusher:subscription_succeeded");
    assert.equal(ok.count, 1);
    assert.equal(ok.me.id, "alice");
    assert.deepEqual(ok.me.info, { name: "ALICE" });

    // bob, on two connections, is one member: alice is told once.
    const added = [];
    room.bind("pusher:member_added", (m) => added.push(m));
    const told = once(room, "pusher:member_added");
    const firstBob = bobs[0].subscribe("presence-room");
    const seen = await once(firstBob, "pusher:subscription_succeeded");
    assert.equal(seen.count, 2);
    assert.deepEqual(seen.members, { alice: { name: "ALICE" }, bob: { name: "BOB" } });
    await once(bobs[1].subscribe("presence-room"), "pusher:subscription_succeeded");
    const typing = once(room, "client-typing");
    firstBob.trigger("client-typing", { at: 1 });
    const [, metadata] = await new Promise((resolve) => room.bind("client-typing", (data, meta) => resolve([data, meta])));
    assert.equal(metadata.user_id, "bob", "a presence client event names its sender");
    await typing;
    assert.deepEqual([(await told).id, (await told).info], ["bob", { name: "BOB" }]);
    assert.equal(room.members.count, 2);

    // The HTTP API tells the same, through the library's signed GET.
    const info = await (await api.get({ path: "/channels/presence-room", params: { info: "user_count,subscription_count" } })).json();
    assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });
    const users = await (await api.get({ path: "/channels/presence-room/users" })).json();
    assert.deepEqual(users, { users: [{ id: "alice" }, { id: "bob" }] });
    const listed = await (await api.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } })).json();
    assert.deepEqual(listed, { channels: { "presence-room": { user_count: 2 } } });

    // bob leaves when his last connection does; his second connection was no second join
    // (member events go out in order, so one would have come before this leave).
    const removed = once(room, "pusher:member_removed");
    bobs[0].disconnect();
    bobs[1].disconnect();
    assert.equal((await removed).id, "bob");
    assert.equal(room.members.count, 1);
    assert.deepEqual(added.map((m) => m.id), ["bob"], "bob joined once");
  } finally {
    alice.disconnect();
    bobs.forEach((b) => b.disconnect());
    await server.stop();
  }
});

test("a presence channel is one across two nodes on Redis: members on either are listed and told", async () => {
  const redis = await startRedis(await freePort());
  const args = ["--registry", "redis", "--redis-url", redis.url, "--presence-batch", "20ms"];
  const a = await pusherServer(args);
  const b = await pusherServer(args);
  const alice = member(a.port, a.api, "alice");
  const bob = member(b.port, b.api, "bob");
  try {
    const room = alice.subscribe("presence-room");
    await once(room, "pusher:subscription_succeeded");
    const told = once(room, "pusher:member_added");
    const there = await once(bob.subscribe("presence-room"), "pusher:subscription_succeeded");
    assert.deepEqual(Object.keys(there.members).sort(), ["alice", "bob"], "the other node's member is listed");
    assert.equal((await told).id, "bob");
    // An event through node b's API reaches alice on node a.
    const got = once(room, "hello");
    await b.api.trigger("presence-room", "hello", { from: "b" });
    assert.deepEqual(await got, { from: "b" });
    const removed = once(room, "pusher:member_removed");
    bob.disconnect();
    assert.equal((await removed).id, "bob");
  } finally {
    alice.disconnect();
    bob.disconnect();
    await Promise.all([a.server.stop(), b.server.stop()]);
    await redis.stop();
  }
});

test("Pusher webhooks: channel_occupied/vacated, member_added/removed and client_event, each batch valid to the pusher library's own check", async () => {
  const http = await import("node:http");
  const events = [];
  let invalid = 0;
  const checker = new PusherServer({ ...APP, host: "127.0.0.1", port: "1", useTLS: false });
  const receiver = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const webhook = checker.webhook({ headers: req.headers, rawBody: body });
      if (webhook.isValid()) events.push(...webhook.getEvents());
      else invalid++;
      res.end("{}");
    });
  });
  await new Promise((resolve) => receiver.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${receiver.address().port}/pusher`;
  const { server, port, api } = await pusherServer(["--pusher-webhook-url", url, "--pusher-webhook-client-events", "--pusher-client-events", "--presence-batch", "20ms"]);
  const until = async (n) => {
    for (let i = 0; i < 500 && events.length < n; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    return events.map(({ name, channel, user_id, event }) => [name, channel, event ?? user_id ?? null]).sort();
  };
  const alice = member(port, api, "alice");
  try {
    const room = alice.subscribe("presence-room");
    await once(room, "pusher:subscription_succeeded");
    assert.deepEqual(await until(2), [["channel_occupied", "presence-room", null], ["member_added", "presence-room", "alice"]]);
    events.length = 0;
    room.trigger("client-wave", { hi: 1 });
    assert.deepEqual(await until(1), [["client_event", "presence-room", "client-wave"]]);
    assert.equal(events[0].data, JSON.stringify({ hi: 1 }));
    assert.equal(events[0].user_id, "alice");
    assert.equal(events[0].socket_id, alice.connection.socket_id);
    events.length = 0;
    alice.disconnect();
    assert.deepEqual(await until(2), [["channel_vacated", "presence-room", null], ["member_removed", "presence-room", "alice"]]);
    assert.equal(invalid, 0, "every batch's X-Pusher-Signature checks out");
  } finally {
    alice.disconnect();
    await server.stop();
    receiver.close();
  }
});

test("a member who comes and goes within one presence batch is still told to a client that subscribed in between", async () => {
  const { server, port, api } = await pusherServer(["--presence-batch", "400ms"]);
  const [x, s] = [member(port, api, "x"), member(port, api, "s")];
  try {
    await once(x.subscribe("presence-g"), "pusher:subscription_succeeded");
    const room = s.subscribe("presence-g");
    const listed = await once(room, "pusher:subscription_succeeded");
    assert.deepEqual(Object.keys(listed.members).sort(), ["s", "x"], "s listed x as it was when s came");
    const removed = once(room, "pusher:member_removed");
    x.unsubscribe("presence-g");
    // x's join and leave fall in one batch: s, which saw x joined, is told x left.
    assert.equal((await removed).id, "x");
    assert.equal(room.members.count, 1);
  } finally {
    x.disconnect();
    s.disconnect();
    await server.stop();
  }
});

test("Laravel Echo (its pusher broadcaster, on pusher-js) listens, whispers and joins as a Laravel app's browser would", async () => {
  const { default: Echo } = await import("laravel-echo");
  const { server, port, api } = await pusherServer(["--pusher-client-events", "--presence-batch", "20ms"]);
  const echo = (user) =>
    new Echo({
      broadcaster: "pusher",
      key: APP.key,
      cluster: "local",
      wsHost: "127.0.0.1",
      wsPort: port,
      forceTLS: false,
      enabledTransports: ["ws"],
      Pusher,
      // As a Laravel app's /broadcasting/auth answers, with the pusher library.
      authorizer: (channel) => ({
        authorize: (socketId, callback) => {
          const presence = channel.name.startsWith("presence-") ? { user_id: user, user_info: { name: user } } : undefined;
          callback(null, api.authorizeChannel(socketId, channel.name, presence));
        },
      }),
    });
  const [ann, ben] = [echo("ann"), echo("ben")];
  try {
    // A Laravel event broadcast on a private channel: Echo's `private('orders')` is `private-orders`.
    const shipped = new Promise((resolve) => ann.private("orders").listen(".OrderShipped", resolve));
    await once(ann.connector.pusher.channel("private-orders"), "pusher:subscription_succeeded");
    await api.trigger("private-orders", "OrderShipped", { order: 7 });
    assert.deepEqual(await shipped, { order: 7 });

    // Presence: `join('room')` is `presence-room`; `here`, `joining`, `whisper`.
    const here = new Promise((resolve) => ann.join("room").here(resolve));
    assert.deepEqual((await here).map((m) => m.name), ["ann"]);
    const joining = new Promise((resolve) => ann.join("room").joining(resolve));
    const benRoom = ben.join("room");
    await new Promise((resolve) => benRoom.here(resolve));
    assert.equal((await joining).name, "ben");
    const whispered = new Promise((resolve) => ann.join("room").listenForWhisper("typing", resolve));
    benRoom.whisper("typing", { ben: true });
    assert.deepEqual(await whispered, { ben: true });
  } finally {
    ann.disconnect();
    ben.disconnect();
    await server.stop();
  }
});

/** A pusher-js client that signs in as `user` (the application signs with the pusher library). */
function signedIn(port, api, user) {
  return new Pusher(APP.key, {
    cluster: "local", wsHost: "127.0.0.1", wsPort: port, forceTLS: false, enabledTransports: ["ws"], disableStats: true,
    userAuthentication: { customHandler: ({ socketId }, callback) => callback(null, api.authenticateUser(socketId, { id: user, name: user })) },
    channelAuthorization: { customHandler: ({ socketId, channelName }, callback) => callback(null, api.authorizeChannel(socketId, channelName)) },
  });
}

/** Resolves with the close code once pusher-js's connection is `disconnected` and stays so. */
function closedFor(pusher) {
  return new Promise((resolve) => {
    pusher.connection.bind("error", (e) => e?.data?.code && resolve(e.data.code));
  });
}

test("signin across two nodes: sendToUser reaches each of the user's connections once, terminateUserConnections closes them all with 4009, and pusher-js stays away; channels and cache channels are every node's", async () => {
  const redis = await startRedis(await freePort());
  const args = ["--registry", "redis", "--redis-url", redis.url];
  const a = await pusherServer(args);
  const b = await pusherServer(args);
  const [onA, onB, other] = [signedIn(a.port, a.api, "carol"), signedIn(b.port, b.api, "carol"), signedIn(b.port, b.api, "dave")];
  try {
    await Promise.all([onA, onB, other].map(connected));
    const signins = [onA, onB, other].map((p) => new Promise((resolve) => p.connection.bind("message", (m) => m.event === "pusher:signin_success" && resolve(JSON.parse(m.data.user_data)))));
    [onA, onB, other].forEach((p) => p.signin());
    assert.deepEqual((await signins[0]).id, "carol");
    await Promise.all(signins);
    // pusher-js subscribes to the user's own channel once signed in.
    await Promise.all([onA, onB, other].map((p) => new Promise((resolve) => {
      const check = () => (p.user.serverToUserChannel?.subscribed ? resolve() : setTimeout(check, 10));
      check();
    })));

    const got = [onA, onB].map((p) => new Promise((resolve) => p.user.bind("notice", resolve)));
    let daveGot = false;
    other.user.bind("notice", () => (daveGot = true));
    await a.api.sendToUser("carol", "notice", { n: 1 });
    assert.deepEqual(await Promise.all(got), [{ n: 1 }, { n: 1 }], "both of carol's connections, one per node");

    // A cache channel's last event, published on node a with no one subscribed, is given on node b.
    await a.api.trigger("cache-weather", "now", { sky: "grey" });
    assert.deepEqual(await once(other.subscribe("cache-weather"), "now"), { sky: "grey" });
    assert.deepEqual((await (await a.api.get({ path: "/channels/cache-weather" })).json()).occupied, true);
    // The channel list is every node's, read from either node; users' channels are not in it.
    const listed = await (await a.api.get({ path: "/channels" })).json();
    assert.deepEqual(listed.channels, { "cache-weather": {} });

    const closes = [onA, onB].map(closedFor);
    const response = await b.api.terminateUserConnections("carol");
    assert.equal(response.status, 200);
    assert.deepEqual(await Promise.all(closes), [4009, 4009]);
    assert.equal(onA.connection.state, "disconnected", "4009 is a close pusher-js does not reconnect after");
    // dave is untouched: an event to him still arrives, and he saw none of carol's.
    const daves = new Promise((resolve) => other.user.bind("notice", resolve));
    await a.api.sendToUser("dave", "notice", { n: 2 });
    assert.deepEqual(await daves, { n: 2 });
    assert.equal(daveGot, true);
  } finally {
    [onA, onB, other].forEach((p) => p.disconnect());
    await Promise.all([a.server.stop(), b.server.stop()]);
    await redis.stop();
  }
});

test("a user's channel is held only by a connection signed in as that user; a forged signin and reserved event names are refused", async () => {
  const { server, port, api } = await pusherServer();
  const ws = new WebSocket(`ws://127.0.0.1:${port}/app/${APP.key}?protocol=7&client=js&version=8.4.0`);
  const frames = [];
  const next = (event) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event}; got ${JSON.stringify(frames)}`)), 5000);
    const look = () => {
      const i = frames.findIndex((f) => f.event === event);
      if (i >= 0) { clearTimeout(timer); resolve(frames.splice(i, 1)[0]); } else setTimeout(look, 5);
    };
    look();
  });
  ws.on("message", (data) => frames.push(JSON.parse(data)));
  try {
    const established = await next("pusher:connection_established");
    const socketId = JSON.parse(established.data).socket_id;
    ws.send(JSON.stringify({ event: "pusher:subscribe", data: { channel: "#server-to-user-erin" } }));
    assert.equal((await next("pusher:subscription_error")).data.status, 403);
    // Signed for another socket: refused.
    const forged = api.authenticateUser("1.1", { id: "erin" });
    ws.send(JSON.stringify({ event: "pusher:signin", data: forged }));
    assert.match((await next("pusher:error")).data.message, /Invalid signature/);
    ws.send(JSON.stringify({ event: "pusher:signin", data: api.authenticateUser(socketId, { id: "erin" }) }));
    await next("pusher:signin_success");
    ws.send(JSON.stringify({ event: "pusher:subscribe", data: { channel: "#server-to-user-erin" } }));
    await next("pusher_internal:subscription_succeeded");
    ws.send(JSON.stringify({ event: "pusher:signin", data: api.authenticateUser(socketId, { id: "frank" }) }));
    assert.match((await next("pusher:error")).data.message, /another user/);
    await assert.rejects(api.trigger("news", "pusher_internal:terminate", {}), (e) => e.status === 400);
    // Unsubscribing does not let go of the user's channel: the app still reaches it.
    ws.send(JSON.stringify({ event: "pusher:unsubscribe", data: { channel: "#server-to-user-erin" } }));
    await api.sendToUser("erin", "still", { here: true });
    assert.equal(JSON.parse((await next("still")).data).here, true);
  } finally {
    ws.close();
    await server.stop();
  }
});

test("cache channels give a new subscriber the last event, or pusher:cache_miss; channels are listed and described through the signed API", async () => {
  const { server, port, api } = await pusherServer(["--presence-batch", "20ms", "--pusher-client-events"]);
  const [reader, late] = [client(port, api), client(port, api)];
  try {
    await Promise.all([connected(reader), connected(late)]);
    const empty = reader.subscribe("cache-empty");
    await once(empty, "pusher:cache_miss");
    await api.trigger("cache-scores", "goal", { n: 1 });
    await api.trigger("cache-scores", "goal", { n: 2 });
    const scores = reader.subscribe("cache-scores");
    assert.deepEqual(await once(scores, "goal"), { n: 2 }, "the last event, once subscribed");
    assert.equal(scores.subscribed, true);
    const live = once(scores, "goal");
    await api.trigger("cache-scores", "goal", { n: 3 });
    assert.deepEqual(await live, { n: 3 });
    // A private cache channel is authorized as a private one.
    await api.trigger("private-cache-box", "state", "full");
    const box = late.subscribe("private-cache-box");
    assert.equal(await once(box, "state"), "full");
    // A client's event on a cache channel is not what later subscribers are given.
    box.trigger("client-poison", { bad: true });
    const clientEvents = async () => Number((await (await fetch(`${server.admin}/metrics`)).text()).match(/^pushline_pusher_events_total\{app="42",source="client"\} (\d+)$/m)?.[1]);
    while ((await clientEvents()) < 1) await new Promise((resolve) => setTimeout(resolve, 10));
    const readerBox = reader.subscribe("private-cache-box");
    let poisoned = false;
    readerBox.bind("client-poison", () => (poisoned = true));
    assert.equal(await once(readerBox, "state"), "full");
    assert.equal(poisoned, false);
    const news = late.subscribe("news");
    await once(news, "pusher:subscription_succeeded");

    const all = await (await api.get({ path: "/channels", params: { info: "subscription_count" } })).json();
    assert.deepEqual(all.channels, {
      "cache-empty": { subscription_count: 1 },
      "cache-scores": { subscription_count: 1 },
      news: { subscription_count: 1 },
      "private-cache-box": { subscription_count: 2 },
    });
    const prefixed = await (await api.get({ path: "/channels", params: { filter_by_prefix: "cache-" } })).json();
    assert.deepEqual(Object.keys(prefixed.channels), ["cache-empty", "cache-scores"]);
    assert.deepEqual(await (await api.get({ path: "/channels/news", params: { info: "subscription_count" } })).json(), { occupied: true, subscription_count: 1 });
    assert.deepEqual(await (await api.get({ path: "/channels/nobody-here" })).json(), { occupied: false });
    await assert.rejects(api.get({ path: "/channels", params: { info: "user_count" } }), (e) => e.status === 400);

    // Metrics by app: its open connections, and its events by source (one per channel).
    const metrics = await (await fetch(`${server.admin}/metrics`)).text();
    assert.match(metrics, /^pushline_pusher_connections\{app="42"\} 2$/m);
    assert.match(metrics, /^pushline_pusher_events_total\{app="42",source="api"\} 4$/m);
    assert.match(metrics, /^pushline_pusher_events_total\{app="42",source="client"\} 1$/m);
    const stats = await (await fetch(`${server.admin}/debug/stats`)).json();
    assert.deepEqual([stats.transports.pusher, stats.pusher_apps["42"]], [2, 2], "the dashboard's connections by protocol and app");

    // A trigger asking `info` is answered with the attributes of the channels it went to.
    const triggered = await (await api.trigger(["news", "private-cache-box"], "tick", {}, { info: "subscription_count" })).json();
    assert.deepEqual(triggered, { channels: { news: { subscription_count: 1 }, "private-cache-box": { subscription_count: 2 } } });
    const batch = await api.triggerBatch([
      { channel: "news", name: "tick", data: {}, info: "subscription_count" },
      { channel: "cache-empty", name: "tick", data: {} },
    ]);
    assert.deepEqual(await batch.json(), { batch: [{ subscription_count: 1 }, {}] });
    await assert.rejects(api.trigger("news", "tick", {}, { info: "everything" }), (e) => e.status === 400);
    await assert.rejects(api.triggerBatch([]), (e) => e.status === 400, "an empty batch");
  } finally {
    reader.disconnect();
    late.disconnect();
    await server.stop();
  }
});

test("clients' events are kept in no history: however many, a cache channel still gives the application's last event, on one node and across two on Redis", async () => {
  const redis = await startRedis(await freePort());
  const settings = ["--history-size", "2", "--pusher-client-events"];
  const alone = await pusherServer(settings);
  const onRedis = ["--registry", "redis", "--redis-url", redis.url, ...settings];
  const [a, b] = [await pusherServer(onRedis), await pusherServer(onRedis)];
  const clients = [];
  try {
    for (const [name, first, second] of [["one node", alone, alone], ["two nodes", a, b]]) {
      const talker = client(first.port, first.api);
      const late = client(second.port, second.api);
      clients.push(talker, late);
      await Promise.all([connected(talker), connected(late)]);
      await first.api.trigger("private-cache-room", "state", { topic: "weather" });
      const room = talker.subscribe("private-cache-room");
      assert.deepEqual(await once(room, "state"), { topic: "weather" }, name);
      // More client events than the channel's history holds.
      for (let n = 0; n < 5; n++) room.trigger("client-typing", { n });
      const clientEvents = async () => Number((await (await fetch(`${first.server.admin}/metrics`)).text()).match(/^pushline_pusher_events_total\{app="42",source="client"\} (\d+)$/m)?.[1] ?? 0);
      while ((await clientEvents()) < 5) await new Promise((resolve) => setTimeout(resolve, 10));
      const cached = late.subscribe("private-cache-room");
      const missed = once(cached, "pusher:cache_miss").then(() => "cache_miss", () => "none");
      assert.deepEqual(await Promise.race([once(cached, "state"), missed]), { topic: "weather" }, `${name}: the application's last event`);
    }
  } finally {
    clients.forEach((c) => c.disconnect());
    await Promise.all([alone.server.stop(), a.server.stop(), b.server.stop()]);
    await redis.stop();
  }
});

test("[[pusher_app]] tables give each app its own options: a connection quota (4004), allowed origins (4009) and client events", async () => {
  const { writeFileSync, mkdtempSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const path = await import("node:path");
  const file = path.join(mkdtempSync(path.join(tmpdir(), "pushline-")), "pushline.toml");
  writeFileSync(file, `
[[pusher_app]]
id = "1"
key = "quiet-key"
secret = "quiet-secret-sixteen-bytes"
max_connections = 1
allowed_origins = ["https://good.example"]

[[pusher_app]]
id = "2"
key = "chatty-key"
secret = "chatty-secret-sixteen-bytes"
client_events = true
`);
  const port = await freePort();
  const server = await startServer(port, ["--config", file]);
  const open = (key, origin) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/app/${key}?protocol=7`, origin ? { origin } : {});
    const frames = [];
    const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
    const first = new Promise((resolve) => ws.on("message", (data) => { frames.push(JSON.parse(data)); if (frames.length === 1) resolve(frames[0]); }));
    return { ws, frames, closed, first };
  };
  const quiet = new PusherServer({ appId: "1", key: "quiet-key", secret: "quiet-secret-sixteen-bytes", host: "127.0.0.1", port: String(port), useTLS: false });
  const chatty = new PusherServer({ appId: "2", key: "chatty-key", secret: "chatty-secret-sixteen-bytes", host: "127.0.0.1", port: String(port), useTLS: false });
  const sockets = [];
  try {
    const refusedOrigin = open("quiet-key", "https://evil.example");
    assert.equal((await refusedOrigin.first).data.code, 4009);
    assert.equal(await refusedOrigin.closed, 4009);

    const one = open("quiet-key", "https://Good.Example");
    sockets.push(one.ws);
    assert.equal((await one.first).event, "pusher:connection_established");
    const two = open("quiet-key");
    assert.equal(await two.closed, 4004, "the app's second connection is over its quota of 1");

    // Client events: off for app 1 (the default), on for app 2.
    const subscribe = (conn, api, channel) => {
      const socketId = JSON.parse(conn.frames[0].data).socket_id;
      conn.ws.send(JSON.stringify({ event: "pusher:subscribe", data: { channel, ...api.authorizeChannel(socketId, channel) } }));
    };
    const waitFor = (conn, test) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`not seen; got ${JSON.stringify(conn.frames)}`)), 5000);
      const look = () => { const f = conn.frames.find(test); if (f) { clearTimeout(timer); resolve(f); } else setTimeout(look, 5); };
      look();
    });
    subscribe(one, quiet, "private-a");
    await waitFor(one, (f) => f.event === "pusher_internal:subscription_succeeded");
    // A subscription whose fields are not strings is refused on its channel, which the
    // client can then stop waiting for.
    one.ws.send(JSON.stringify({ event: "pusher:subscribe", data: { channel: "presence-x", auth: "k:1", channel_data: { user_id: "a" } } }));
    const invalid = await waitFor(one, (f) => f.event === "pusher:subscription_error");
    assert.equal(invalid.channel, "presence-x");
    one.ws.send(JSON.stringify({ event: "client-x", channel: "private-a", data: {} }));
    assert.match((await waitFor(one, (f) => f.event === "pusher:error")).data.message, /enable this feature/);

    const [c1, c2] = [open("chatty-key"), open("chatty-key")];
    sockets.push(c1.ws, c2.ws);
    await Promise.all([c1.first, c2.first]);
    subscribe(c1, chatty, "private-b");
    subscribe(c2, chatty, "private-b");
    await Promise.all([c1, c2].map((c) => waitFor(c, (f) => f.event === "pusher_internal:subscription_succeeded")));
    c1.ws.send(JSON.stringify({ event: "client-x", channel: "private-b", data: { hi: 1 } }));
    assert.deepEqual((await waitFor(c2, (f) => f.event === "client-x")).data, { hi: 1 });

    // Each refusal is counted under what it was, once.
    const unknown = open("no-such-key");
    assert.equal(await unknown.closed, 4001);
    const metrics = await (await fetch(`${server.admin}/metrics`)).text();
    const refused = (reason) => Number(metrics.match(new RegExp(`pushline_connections_refused_total\\{reason="${reason}"\\} (\\d+)`))?.[1] ?? 0);
    assert.deepEqual(
      { forbidden: refused("forbidden"), max_connections: refused("max_connections"), unauthorized: refused("unauthorized"), bad_request: refused("bad_request") },
      { forbidden: 1, max_connections: 1, unauthorized: 1, bad_request: 0 },
    );
  } finally {
    sockets.forEach((s) => s.close());
    await server.stop();
  }
});
