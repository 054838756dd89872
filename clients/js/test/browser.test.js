// In a real browser (Debian's chromium, headless, driven by puppeteer-core; nothing is
// downloaded): the admin dashboard with a few hundred connections, the demo page through a
// server restart, and the client's SSE path from a page on another origin. Screenshots of
// both pages go to docs/.

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import puppeteer from "puppeteer-core";

import { freePort, startServer, publish } from "../harness.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const docs = path.join(here, "../../../docs");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

async function browser() {
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install -y chromium (scripts/test does this as root)`);
  return puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
}

/** `n` open WebSocket connections, each welcomed. */
async function viewers(url, n) {
  const sockets = [];
  for (let i = 0; i < n; i++) {
    const ws = new WebSocket(`${url.replace("http", "ws")}/ws?uid=viewer${i}&topics=news`);
    await new Promise((resolve, reject) => {
      ws.once("message", resolve);
      ws.once("error", reject);
    });
    sockets.push(ws);
  }
  return sockets;
}

test("the dashboard draws a live server, lists its connections and shows a CPU flame graph", async () => {
  const server = await startServer(await freePort());
  const sockets = await viewers(server.url, 300);
  const chrome = await browser();
  const traffic = setInterval(() => publish(server.url, { topic: "news", data: "tick" }).catch(() => {}), 200);
  try {
    const page = await chrome.newPage();
    await page.setViewport({ width: 1400, height: 1100 });
    await page.goto(server.admin, { waitUntil: "load" });
    await page.waitForFunction(() => window.pushline.points >= 3, { timeout: 20000 });
    await page.waitForFunction(() => document.querySelectorAll("#table tbody tr").length >= 100, { timeout: 20000 });
    const uids = await page.$$eval("#table tbody tr td:first-child", (cells) => cells.map((c) => c.textContent));
    assert.ok(uids.every((uid) => /^viewer\d+$/.test(uid)), `the connections table lists the uids: ${uids.slice(0, 5)}`);
    await page.type("#uid", "viewer42");
    await page.waitForFunction(() => [...document.querySelectorAll("#table tbody tr td:first-child")].map((c) => c.textContent).join() === "viewer42", { timeout: 10000 });
    await page.$eval("#uid", (el) => { el.value = ""; el.dispatchEvent(new Event("input")); });
    await page.waitForFunction(() => document.querySelectorAll("#table tbody tr").length >= 100, { timeout: 10000 });
    assert.equal(await page.$eval("#conns", (el) => el.textContent), "300");
    await page.waitForFunction(() => [...document.querySelectorAll("#protocols tr")].some((row) => row.textContent === "ws300"), { timeout: 10000 });
    const bytes = await page.$eval("#bytes-legend", (el) => el.textContent);
    assert.match(bytes, /connection_task: \d+ B/);
    assert.match(await page.$eval("#fragmentation", (el) => el.textContent), /fragmentation \(active \/ allocated\) \d\.\d{3}/);

    // The minute this is, picked by its time: the server's traffic is in it.
    await page.$eval("#minutes", (el) => (el.value = "1"));
    await page.$eval("#at", (el) => {
      const now = new Date();
      el.value = `${String(now.getHours()).padStart(2, "0")}:${String(now.getMinutes()).padStart(2, "0")}`;
    });
    await page.click("#cpu");
    await page.waitForSelector("#flame svg", { timeout: 20000 });
    // What changed from the 5 minutes before: a server this young did not run then, and
    // the page says what is kept.
    await page.click("#changed");
    await page.click("#cpu");
    await page.waitForFunction(() => document.getElementById("flame-status").textContent.includes("not kept"), { timeout: 20000 });
    await page.click("#changed");
    await page.$eval("#at", (el) => (el.value = ""));
    await page.click("#cpu");
    await page.waitForFunction(() => document.getElementById("flame-status").textContent === "", { timeout: 20000 });
    await page.waitForSelector("#flame svg", { timeout: 20000 });
    mkdirSync(docs, { recursive: true });
    await page.screenshot({ path: path.join(docs, "dashboard.png"), fullPage: true });
  } finally {
    clearInterval(traffic);
    await chrome.close();
    sockets.forEach((ws) => ws.terminate());
    await server.stop();
  }
});

test("the demo page receives a push, survives a server restart and resumes", async () => {
  const port = await freePort();
  let server = await startServer(port, ["--demo"]);
  const chrome = await browser();
  try {
    const page = await chrome.newPage();
    await page.setViewport({ width: 900, height: 700 });
    await page.goto(`${server.url}/demo`, { waitUntil: "load" });
    await page.waitForFunction(() => window.demo.client?.state === "open", { timeout: 10000 });
    await publish(server.url, { topic: "news", data: "from the test" });
    await page.waitForFunction(() => window.demo.messages.some((m) => m.data === "from the test"), { timeout: 10000 });

    await server.stop();
    await page.waitForFunction(() => window.demo.client.state === "reconnecting", { timeout: 10000 });
    server = await startServer(port, ["--demo"]);
    await page.waitForFunction(() => window.demo.resumed.length >= 1 && window.demo.client.state === "open", { timeout: 20000 });
    await publish(server.url, { topic: "news", data: "after the restart" });
    await page.waitForFunction(() => window.demo.messages.some((m) => m.data === "after the restart"), { timeout: 10000 });
    mkdirSync(docs, { recursive: true });
    await page.screenshot({ path: path.join(docs, "demo.png") });
  } finally {
    await chrome.close();
    await server.stop();
  }
});

test("a page on another origin reads the stream over SSE", async () => {
  const server = await startServer(await freePort());
  const client = readFileSync(path.join(here, "../src/index.js"));
  const page = `<!doctype html><script type="module">
    import { PushlineClient } from "/client.js";
    window.got = [];
    const c = new PushlineClient(${JSON.stringify(server.url)}, { uid: "far", topics: ["news"], transport: "sse" });
    c.on("message", (m) => window.got.push(m.data));
    c.on("welcome", () => (window.welcomed = true));
    c.connect();
  </script>`;
  const origin = http.createServer((req, res) => {
    const js = req.url === "/client.js";
    res.writeHead(200, { "content-type": js ? "text/javascript" : "text/html" });
    res.end(js ? client : page);
  });
  await new Promise((resolve) => origin.listen(0, "127.0.0.1", resolve));
  const chrome = await browser();
  try {
    const tab = await chrome.newPage();
    await tab.goto(`http://127.0.0.1:${origin.address().port}/`, { waitUntil: "load" });
    await tab.waitForFunction(() => window.welcomed === true, { timeout: 10000 });
    await publish(server.url, { topic: "news", data: "across origins" });
    await tab.waitForFunction(() => window.got.includes("across origins"), { timeout: 10000 });
  } finally {
    await chrome.close();
    await new Promise((resolve) => origin.close(resolve));
    await server.stop();
  }
});
