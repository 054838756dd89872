// Server CPU with the admin dashboard open vs closed: node bench/dashboard-cost.mjs <pid> <admin port> <seconds>
// (ticks from /proc/<pid>/stat; run it against a server holding connections, e.g. pushline-bench idle --hold).
import puppeteer from "puppeteer-core";
import { readFileSync } from "node:fs";
const [pid, admin, secs] = process.argv.slice(2);
const ticks = () => { const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" "); return +f[11] + +f[12]; };
const wait = (ms) => new Promise((r) => setTimeout(r, ms));
let a = ticks(); await wait(secs * 1000); let b = ticks();
console.log(`closed: ${(b - a) * 10} ms CPU over ${secs} s = ${((b - a) * 10 / (secs * 10)).toFixed(2)}% of a core`);
const chrome = await puppeteer.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
const page = await chrome.newPage();
await page.goto(`http://127.0.0.1:${admin}/`, { waitUntil: "load" });
await wait(3000);
a = ticks(); await wait(secs * 1000); b = ticks();
console.log(`open: ${(b - a) * 10} ms CPU over ${secs} s = ${((b - a) * 10 / (secs * 10)).toFixed(2)}% of a core; polls ${await page.evaluate(() => window.pushline.polls)}`);
await chrome.close();
