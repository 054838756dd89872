// Test harness: the real `pushline` binary (PUSHLINE_BIN, or the debug build), started on
// a port of the test's choosing so it can be started again there; a TCP proxy in front of
// it that can drop every connection, as a network would.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.PUSHLINE_BIN ?? path.join(here, "../../target/debug/pushline");

export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Starts the server; resolves once it logs its addresses. */
export async function startServer(port, args = []) {
  const child = spawn(BIN, ["--listen", `127.0.0.1:${port}`, "--admin-listen", "127.0.0.1:0", "--log", "warn,pushline::server=info", ...args], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const admin = await new Promise((resolve, reject) => {
    child.once("exit", (code) => reject(new Error(`pushline exited (${code}) before listening; is it built? (${BIN})`)));
    lines.on("line", (line) => {
      const found = line.match(/listening client=\S+ admin=(\S+)/);
      if (found) resolve(found[1]);
    });
  });
  return { child, url: `http://127.0.0.1:${port}`, admin: `http://${admin}`, stop: () => stop(child) };
}

function stop(child) {
  // A child killed by a signal has no exit code, only its signal.
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once("exit", resolve);
    child.kill("SIGKILL");
  });
}

/** A `redis-server` on `port` with nothing saved; resolves once it accepts connections. */
export async function startRedis(port) {
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const lines = createInterface({ input: child.stdout });
  await new Promise((resolve, reject) => {
    child.once("error", (e) => reject(new Error(`cannot run redis-server (${e.message}); apt-get install -y redis-server`)));
    child.once("exit", (code) => reject(new Error(`redis-server exited (${code})`)));
    lines.on("line", (line) => line.includes("Ready to accept connections") && resolve());
  });
  return { url: `redis://127.0.0.1:${port}`, stop: () => stop(child) };
}

/** A proxy to `port` whose connections can all be cut at once. */
export async function proxy(port) {
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(port, "127.0.0.1");
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => s.destroy());
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut: () => sockets.forEach((s) => s.destroy()),
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

export async function publish(url, body, path = "/v1/publish") {
  const response = await fetch(`${url}${path}`, { method: "POST", body: JSON.stringify(body) });
  return { status: response.status, body: await response.json() };
}

/** Resolves with the first `type` event for which `pick` holds. */
export function next(client, type, pick = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${type} within ${ms} ms`)), ms);
    const off = client.on(type, (value) => {
      if (!pick(value)) return;
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}
