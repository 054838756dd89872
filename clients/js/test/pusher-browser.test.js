// The Pusher protocol in a real browser (Debian's chromium, headless, driven by
// puppeteer-core): Laravel Echo on pusher-js's web build, on two pages served by an
// application whose /broadcasting/auth answers with the `pusher` server library, against
// two Pushline nodes sharing one port on Redis. Public, private and presence channels;
// members come and go as pages do, pages whisper to each other, and when the node under a page is killed the page reconnects
// (pusher-js's own backoff) to the other one, and again after that node is restarted.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";
import PusherServer from "pusher";

import { freePort, startServer, startRedis } from "../harness.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const modules = path.join(here, "../node_modules");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const APP = { appId: "7", key: "browser-key", secret: "browser-secret-sixteen-bytes" };

/** The application: a page per user, the two scripts, and the channel authorization endpoint. */
async function application(api, wsPort) {
  const page = (user) => `<!doctype html><meta charset="utf-8"><title>${user}</title>
<script src="/pusher.js"></script><script src="/echo.js"></script>
<script>
  window.log = [];
  window.members = [];
  const echo = new Echo.default({
    broadcaster: "pusher", key: ${JSON.stringify(APP.key)}, cluster: "local",
    wsHost: "127.0.0.1", wsPort: ${wsPort}, forceTLS: false, enabledTransports: ["ws"], disableStats: true,
    authEndpoint: "/broadcasting/auth?user=${user}",
  });
  window.connection = () => ({ state: echo.connector.pusher.connection.state, socketId: echo.socketId() });
  const room = echo.join("room")
    .here((all) => (window.members = all.map((m) => m.name).sort()))
    .joining((m) => (window.members = [...new Set([...window.members, m.name])].sort()))
    .leaving((m) => (window.members = window.members.filter((name) => name !== m.name)))
    .listenForWhisper("typing", (e) => window.log.push(["whisper", e.from]))
    .listen(".Announcement", (e) => window.log.push(["announcement", e.n]));
  window.whisper = () => room.whisper("typing", { from: ${JSON.stringify(user)} });
  echo.channel("news").listen(".Tick", (e) => window.log.push(["tick", e.n]));
  echo.private("orders.${user}").listen(".Shipped", (e) => window.log.push(["shipped", e.n]));
  window.subscribed = () => ["news", "private-orders.${user}", "presence-room"].every((name) => echo.connector.pusher.channel(name)?.subscribed);
</script>`;
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://app");
    if (url.pathname === "/page") {
      res.writeHead(200, { "content-type": "text/html" }).end(page(url.searchParams.get("user")));
    } else if (url.pathname === "/pusher.js") {
      res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(path.join(modules, "pusher-js/dist/web/pusher.min.js")));
    } else if (url.pathname === "/echo.js") {
      res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(path.join(modules, "laravel-echo/dist/echo.iife.js")));
    } else if (url.pathname === "/broadcasting/auth" && req.method === "POST") {
      let body = "";
      req.on("data", (chunk) => (body += chunk));
      req.on("end", () => {
        // As a Laravel app's /broadcasting/auth: the user is the session's, the answer the pusher library's.
        const form = new URLSearchParams(body);
        const user = url.searchParams.get("user");
        const channel = form.get("channel_name");
        const member = channel.startsWith("presence-") ? { user_id: user, user_info: { name: user } } : undefined;
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(api.authorizeChannel(form.get("socket_id"), channel, member)));
      });
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((resolve) => server.close(resolve)) };
}

/** The socket ids of the Pusher connections a node holds (its uids are `pusher:<socket id>`). */
async function socketIds(node) {
  const connections = await (await fetch(`${node.admin}/debug/connections?limit=1000`)).json();
  const list = Array.isArray(connections) ? connections : connections.connections;
  return new Set(list.map((c) => c.uid.replace(/^pusher:/, "")));
}

test("in Chromium, Laravel Echo on pusher-js: members as pages come and go, whispers between pages, and a page reconnects to the other node when its node is killed, then again after a restart", async () => {
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install -y chromium (scripts/test does this as root)`);
  const redis = await startRedis(await freePort());
  const port = await freePort();
  const args = [
    "--registry", "redis", "--redis-url", redis.url, "--reuse-port", "--node-ttl", "2s",
    "--pusher-app", `${APP.appId}:${APP.key}:${APP.secret}`, "--pusher-client-events", "--presence-batch", "20ms",
  ];
  const nodes = [await startServer(port, args), await startServer(port, args)];
  const api = new PusherServer({ ...APP, host: "127.0.0.1", port: String(port), useTLS: false });
  const app = await application(api, port);
  const chrome = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
  const within = { timeout: 20000, polling: 20 };
  try {
    const ann = await chrome.newPage();
    await ann.goto(`${app.url}/page?user=ann`);
    await ann.waitForFunction(() => window.members.join() === "ann", within);
    const ben = await chrome.newPage();
    await ben.goto(`${app.url}/page?user=ben`);
    await ben.waitForFunction(() => window.members.join() === "ann,ben", within);
    await ann.waitForFunction(() => window.members.join() === "ann,ben", within);

    await ben.evaluate(() => window.whisper());
    await ann.waitForFunction(() => window.log.some(([kind, from]) => kind === "whisper" && from === "ben"), within);
    await api.trigger("presence-room", "Announcement", { n: 1 });
    for (const page of [ann, ben]) await page.waitForFunction(() => window.log.some(([kind, n]) => kind === "announcement" && n === 1), within);
    // A public channel reaches both pages; each page's private channel (authorized by the
    // application's endpoint) only its own.
    for (const page of [ann, ben]) await page.waitForFunction(() => window.subscribed(), within);
    await api.trigger("news", "Tick", { n: 1 });
    await api.trigger("private-orders.ben", "Shipped", { n: 7 });
    for (const page of [ann, ben]) await page.waitForFunction(() => window.log.some(([kind, n]) => kind === "tick" && n === 1), within);
    await ben.waitForFunction(() => window.log.some(([kind, n]) => kind === "shipped" && n === 7), within);
    assert.equal(await ann.evaluate(() => window.log.some(([kind]) => kind === "shipped")), false, "ann's page holds only ann's orders");

    // ben leaves: ann is told.
    await ben.close();
    await ann.waitForFunction(() => window.members.join() === "ann", within);
    const ben2 = await chrome.newPage();
    await ben2.goto(`${app.url}/page?user=ben`);
    await ann.waitForFunction(() => window.members.join() === "ann,ben", within);

    // Kill each node in turn (the first is restarted in between): the pages it held
    // reconnect, and land on the one left.
    for (const round of [0, 1]) {
      const killed = nodes[round];
      const held = await socketIds(killed);
      killed.child.kill("SIGKILL");
      await new Promise((resolve) => killed.child.once("exit", resolve));
      for (const page of [ann, ben2]) {
        await page.waitForFunction((held) => {
          const { state, socketId } = window.connection();
          return state === "connected" && socketId && !held.includes(socketId);
        }, within, [...held]);
      }
      // Echo subscribed again: a whisper and an announcement reach the other page.
      for (const page of [ann, ben2]) await page.waitForFunction(() => window.members.join() === "ann,ben", within);
      await ann.evaluate(() => window.whisper());
      await ben2.waitForFunction((round) => window.log.filter(([kind, from]) => kind === "whisper" && from === "ann").length >= round + 1, within, round);
      await api.trigger("presence-room", "Announcement", { n: 10 + round });
      for (const page of [ann, ben2]) await page.waitForFunction((n) => window.log.some(([kind, m]) => kind === "announcement" && m === n), within, 10 + round);
      if (round === 0) nodes[0] = await startServer(port, args);
    }
  } finally {
    await chrome.close();
    await app.close();
    await Promise.all(nodes.map((n) => n.stop()));
    await redis.stop();
  }
});
