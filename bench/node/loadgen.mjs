// Load generator for the circles benchmark in Node: `ws` for the WebSockets, `tiny-secp256k1`
// (libsecp256k1 built to WebAssembly, inside the npm package) and `@noble/hashes` (keccak256) for
// the signatures. The workloads and the JSON it prints are
// those of bench/loadgen.py, so bench/run.py reads either (`--generator node|python`):
//
//     node bench/node/loadgen.mjs rpc   --url ws://127.0.0.1:8080 --connections 50 --duration 10
//     node bench/node/loadgen.mjs auth  --url ws://127.0.0.1:8080 --concurrency 20 --duration 10
//     node bench/node/loadgen.mjs idle  --url ws://127.0.0.1:8080 --count 10000 --server-pid PID
//     node bench/node/loadgen.mjs churn --url ws://127.0.0.1:8080 --rounds 10 --per-round 10000 --server-pid PID
//     node bench/node/loadgen.mjs play  --url ws://127.0.0.1:8080 --circle PK --connections 50 --duration 20
//     node bench/node/loadgen.mjs --check        # the versions it runs with, as JSON
//
// One workload per run: one JSON object on the last line of stdout, a one-line summary on stderr.
//
// * rpc: `fetch_nonce` (or `--method whoami`) on N open connections, each with one request in
//   flight (send, wait for the reply, send the next). Calls/s and p50/p99 latency over
//   `--duration` seconds after `--warmup`.
// * auth: C concurrent clients in a loop: connect, `fetch_nonce`, sign the nonce (EIP-191
//   `personal_sign`: keccak256 of the envelope, a recoverable secp256k1 signature r||s||v with
//   v = 27 + recovery id, as MetaMask and ethers send it), `authenticate`, close (with the closing
//   handshake). Handshakes/s and p50/p99 of a whole handshake; the signing time is inside it and
//   reported as `client_sign_us`.
// * idle: opens `--count` connections `--batch` at a time, holds them, then one `whoami` on each
//   must be answered; server RSS (/proc/<pid>/status VmRSS) before and with them, per connection.
// * churn: `--rounds` rounds of `--per-round` connections (connect, `fetch_nonce`, close), server
//   RSS after every round, the last compared with the first.
// * play (bench/play.py --generator node): N connections authenticate on the circle `--circle`,
//   then each plays `40 + 2` in a loop, one in flight; plays/s and latency. With `--rate R` the
//   load is an open loop instead: R plays a second in all, sent on the connections in turn on a
//   1 ms tick whatever the replies (at most 50 waiting on a connection: a play due on a fuller
//   one is counted in `behind` and not sent), each latency from its own send; so that
//   configurations are compared at the same load, not each at its own saturation. It prints
//   "window start" and "window end" on stderr around the measured window, so that the caller can
//   take the worker's CPU time over the same window.
//
// With `--server-pid` rpc and auth also report the server's CPU time over the measured window
// (utime+stime from /proc/<pid>/stat) and the share of the server's CPUs that other processes
// used. `--procs P` splits rpc/auth over P worker threads (one event loop each). With
// `--mark-window` rpc prints "window start" and "window end" on stderr as play does (so that
// bench/processes.py takes the CPU of every server process over the same window).
//
// Clients send no permessage-deflate offer and no pings, mask frames with an all-zero key (the
// server unmasks every frame as usual; ws then copies no payload), and spread their source
// addresses over 127.0.0.2-127.0.0.63 so that tens of thousands of connects do not run out of
// ephemeral ports on one address pair. Every loop ends by `--duration` (or its counts).

import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

import { randomBytes } from 'node:crypto';
import { keccak_256 } from '@noble/hashes/sha3.js';
import * as secp from 'tiny-secp256k1';
import WebSocket from 'ws';

const ETH_PREFIX = '\x19Ethereum Signed Message:\n';
const SOURCE_ADDRESSES = Array.from({ length: 62 }, (_, i) => `127.0.0.${i + 2}`);
let sourceIndex = 0;
const CLIENT = 'node-ws';

// --- helpers ---------------------------------------------------------------------------------

const now = () => performance.now() / 1000; // seconds, monotonic
const sleep = (s) => new Promise((resolve) => setTimeout(resolve, Math.max(0, s * 1000)));
const hex = (bytes) => Buffer.from(bytes).toString('hex');
const round = (value, digits) => Math.round(value * 10 ** digits) / 10 ** digits;

let clockTicks = null;
function clkTck() {
  if (clockTicks === null) {
    try {
      clockTicks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clockTicks = 100;
    }
  }
  return clockTicks;
}

function newKey() {
  let secret;
  do secret = randomBytes(32); while (!secp.isPrivate(secret));
  return { secret, pubkey: hex(secp.pointFromScalar(secret, true)) };
}

/** EIP-191 personal_sign of `message` (a string, signed as its UTF-8 bytes): hex r||s||v, v = 27 + recovery id. */
function signPersonal(secret, message) {
  const body = Buffer.from(message, 'utf8');
  const digest = keccak_256(Buffer.concat([Buffer.from(ETH_PREFIX + body.length, 'utf8'), body]));
  // libsecp256k1: RFC 6979 nonces, low s (the bytes @noble/secp256k1's sign gives, 2.5x faster).
  const { signature, recoveryId } = secp.signRecoverable(digest, secret);
  const out = new Uint8Array(65);
  out.set(signature, 0);
  out[64] = 27 + recoveryId;
  return '0x' + hex(out);
}

function rssBytes(pid) {
  if (!pid) return null;
  const match = /^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match ? Number(match[1]) * 1024 : null;
}

function cpuSeconds(pid) {
  if (!pid) return null;
  const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = text.slice(text.lastIndexOf(')') + 1).trim().split(/\s+/);
  return (Number(fields[11]) + Number(fields[12])) / clkTck(); // fields 14 and 15 of stat(5)
}

/** The CPUs `pid` may run on (Cpus_allowed_list of /proc/<pid>/status), as a Set. */
function cpusOf(pid) {
  try {
    const match = /^Cpus_allowed_list:\s*(\S+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    const cpus = new Set();
    for (const part of match[1].split(',')) {
      const [a, b] = part.split('-').map(Number);
      for (let c = a; c <= (b ?? a); c++) cpus.add(c);
    }
    return cpus;
  } catch {
    return new Set();
  }
}

/** Busy time (all but idle and iowait) of the given CPUs from /proc/stat, in seconds. */
function cpuBusySeconds(cpus) {
  let busy = 0;
  for (const line of readFileSync('/proc/stat', 'utf8').split('\n')) {
    const [name, ...ticks] = line.trim().split(/\s+/);
    if (!/^cpu\d+$/.test(name) || !cpus.has(Number(name.slice(3)))) continue;
    const values = ticks.map(Number);
    busy += values.slice(0, 8).reduce((a, b) => a + b, 0) - values[3] - values[4];
  }
  return busy / clkTck();
}

function listenOverflows() {
  let lines;
  try {
    lines = readFileSync('/proc/net/netstat', 'utf8').split('\n');
  } catch {
    return null;
  }
  for (let i = 0; i + 1 < lines.length; i += 2) {
    if (lines[i].startsWith('TcpExt:')) {
      const names = lines[i].split(/\s+/).slice(1);
      const values = lines[i + 1].split(/\s+/).slice(1);
      const at = names.indexOf('ListenOverflows');
      return at < 0 ? 0 : Number(values[at]);
    }
  }
  return null;
}

/** Python's round() of a float to an integer: halves go to the even neighbour. */
function roundHalfEven(x) {
  const floor = Math.floor(x);
  const rest = x - floor;
  if (rest > 0.5) return floor + 1;
  if (rest < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

/** The same nearest-rank percentile as bench/loadgen.py. */
function percentile(sorted, q) {
  if (!sorted.length) return null;
  const index = Math.min(sorted.length - 1, Math.max(0, roundHalfEven((q / 100) * sorted.length + 0.5) - 1));
  return sorted[index];
}

function latencySummary(latencies) {
  const values = Float64Array.from(latencies).sort();
  const ms = (v) => (v === null || v === undefined ? null : round(v * 1000, 3));
  return {
    p50_ms: ms(percentile(values, 50)), p90_ms: ms(percentile(values, 90)),
    p99_ms: ms(percentile(values, 99)), max_ms: ms(values.length ? values[values.length - 1] : null),
  };
}

/** Wall time and CPU time (server, this process, the server's CPUs) over a measured window. */
class Window {
  constructor(serverPid) {
    this.serverPid = serverPid;
    this.serverCpus = serverPid ? cpusOf(serverPid) : new Set();
  }

  start() {
    this.t0 = now();
    this.cpu0 = process.cpuUsage();
    this.server0 = cpuSeconds(this.serverPid);
    this.busy0 = cpuBusySeconds(this.serverCpus);
  }

  stop() {
    const wall = now() - this.t0;
    const used = process.cpuUsage(this.cpu0);
    const server = cpuSeconds(this.serverPid);
    const out = { wall_s: round(wall, 3), client_cpu_s: round((used.user + used.system) / 1e6, 3) };
    if (server !== null) {
      out.server_cpu_s = round(server - this.server0, 3);
      if (this.serverCpus.size) {
        // What else ran on the server's CPU(s): other processes take it from the server.
        const others = cpuBusySeconds(this.serverCpus) - this.busy0 - (server - this.server0);
        out.others_on_server_cpu = round(Math.max(0, others) / (wall * this.serverCpus.size), 3);
      }
    }
    return out;
  }
}

async function monitor(tMeasure, tEnd, serverPid, out, mark = false) {
  await sleep(tMeasure - now());
  const window = new Window(serverPid);
  if (mark) process.stderr.write('window start\n');
  window.start();
  await sleep(tEnd - now());
  Object.assign(out, window.stop());
  if (mark) process.stderr.write('window end\n');
}

function withTimeout(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${seconds}s`)), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// --- the client ------------------------------------------------------------------------------

function zeroMask(mask) {
  mask.fill(0);
}

/** One `ws` connection with `send(text)`, `recv()` (the next text message) and `close()`. */
class Connection {
  constructor(ws) {
    this.ws = ws;
    this.inbox = [];
    this.waiter = null;
    this.failure = null;
    this.closed = new Promise((resolve) => ws.once('close', resolve));
    ws.on('message', (data, isBinary) => {
      const item = isBinary ? new Error('expected a text message, got a binary one') : data.toString();
      if (this.waiter) {
        const { resolve, reject } = this.waiter;
        this.waiter = null;
        if (item instanceof Error) reject(item);
        else resolve(item);
      } else {
        this.inbox.push(item);
      }
    });
    ws.on('close', (code) => this.fail(new Error(`connection closed (${code})`)));
    ws.on('error', (e) => this.fail(e));
  }

  fail(error) {
    this.failure ??= error;
    if (this.waiter) {
      const { reject } = this.waiter;
      this.waiter = null;
      reject(this.failure);
    }
  }

  send(text) {
    this.ws.send(text);
  }

  recv() {
    if (this.inbox.length) {
      const item = this.inbox.shift();
      return item instanceof Error ? Promise.reject(item) : Promise.resolve(item);
    }
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** The closing handshake, then the TCP close; resolves when the socket is closed. */
  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return;
    if (this.ws.readyState === WebSocket.CONNECTING) this.ws.terminate();
    else this.ws.close(1000);
    try {
      await withTimeout(this.closed, 10, 'close');
    } catch {
      this.ws.terminate();
    }
  }
}

function open(baseUrl, circle, spread = true, timeout = 30) {
  return new Promise((resolve, reject) => {
    const options = { perMessageDeflate: false, handshakeTimeout: timeout * 1000, generateMask: zeroMask,
                      maxPayload: 64 * 1024 * 1024 };
    if (spread) {
      options.localAddress = SOURCE_ADDRESSES[sourceIndex];
      sourceIndex = (sourceIndex + 1) % SOURCE_ADDRESSES.length;
    }
    const ws = new WebSocket(`${baseUrl}/${circle}`, options);
    const refused = (e) => {
      ws.removeListener('open', opened);
      reject(e instanceof Error ? e : new Error(String(e)));
    };
    const opened = () => {
      ws.removeListener('error', refused);
      resolve(new Connection(ws));
    };
    ws.once('open', opened);
    ws.once('error', refused);
    ws.once('unexpected-response', (_, response) => {
      ws.removeListener('error', refused);
      ws.removeListener('open', opened);
      response.resume();
      ws.terminate();
      reject(new Error(`handshake refused: HTTP ${response.statusCode}`));
    });
  });
}

const describe = (e) => `${e?.name ?? 'Error'}: ${e?.message ?? e}`.slice(0, 300);

// --- workload: rpc ---------------------------------------------------------------------------

async function rpc({ url, connections, duration, warmup, serverPid, method, circle, barrier, markWindow }) {
  circle ??= newKey().pubkey;
  const pubkey = newKey().pubkey;
  const sockets = [];
  for (let i = 0; i < connections; i++) sockets.push(await open(url, circle, false));
  await barrier?.();
  const latencies = [];
  const state = { errors: 0, lastError: null };
  const tMeasure = now() + warmup;
  const tEnd = tMeasure + duration;
  const prefix = method === 'fetch_nonce'
    ? `{"jsonrpc":"2.0","method":"fetch_nonce","params":{"pubkey":"${pubkey}"},"id":`
    : `{"jsonrpc":"2.0","method":"${method}","id":`;
  const expect = method === 'fetch_nonce' ? '"nonce":"' : '"result":';

  async function worker(ws) {
    let n = 0;
    for (;;) {
      const t0 = now();
      if (t0 >= tEnd) return;
      n += 1;
      ws.send(prefix + n + '}');
      const reply = await ws.recv();
      const t1 = now();
      if (!reply.includes(expect)) {
        state.errors += 1;
        state.lastError = `unexpected reply: ${reply.slice(0, 200)}`;
      }
      if (t0 >= tMeasure) latencies.push(t1 - t0);
    }
  }

  const window = {};
  await withTimeout(Promise.all([monitor(tMeasure, tEnd, serverPid, window, markWindow), ...sockets.map(worker)]),
                    warmup + duration + 30, 'rpc');
  await Promise.all(sockets.map((ws) => ws.close()));
  return { latencies, errors: state.errors, last_error: state.lastError, window };
}

// --- workload: auth --------------------------------------------------------------------------

async function auth({ url, concurrency, duration, warmup, serverPid, circle, barrier }) {
  circle ??= newKey().pubkey;
  const keys = Array.from({ length: concurrency }, newKey);
  await barrier?.();
  const latencies = [];
  const state = { errors: 0, signS: 0, signs: 0, lastError: null };
  const tMeasure = now() + warmup;
  const tEnd = tMeasure + duration;

  async function worker(key) {
    const fetch = JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'fetch_nonce', params: { pubkey: key.pubkey } });
    for (;;) {
      const t0 = now();
      if (t0 >= tEnd) return;
      try {
        const ws = await open(url, circle);
        try {
          ws.send(fetch);
          const nonce = JSON.parse(await ws.recv()).result.nonce;
          const s0 = now();
          const signature = signPersonal(key.secret, nonce);
          state.signS += now() - s0;
          state.signs += 1;
          ws.send(JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'authenticate',
                                   params: { pubkey: key.pubkey, signature } }));
          const reply = JSON.parse(await ws.recv());
          if (!reply.result?.authenticated) throw new Error(`not authenticated: ${JSON.stringify(reply).slice(0, 200)}`);
        } finally {
          await ws.close();
        }
      } catch (e) { // counted and reported; the loop goes on until tEnd
        state.errors += 1;
        state.lastError = describe(e);
        await sleep(0.01);
        continue;
      }
      if (t0 >= tMeasure) latencies.push(now() - t0);
    }
  }

  const window = {};
  await withTimeout(Promise.all([monitor(tMeasure, tEnd, serverPid, window), ...keys.map(worker)]),
                    warmup + duration + 60, 'auth');
  return { latencies, errors: state.errors, last_error: state.lastError, window,
           client_sign_us: round((state.signS / Math.max(1, state.signs)) * 1e6, 1) };
}

// --- rpc/auth over one or more threads -------------------------------------------------------

const THROUGHPUT = { rpc, auth };

/** A barrier over `parties` threads on a SharedArrayBuffer: each calls wait() once. */
function sharedBarrier(buffer, parties) {
  const cell = new Int32Array(buffer);
  return () => {
    Atomics.add(cell, 0, 1);
    while (Atomics.load(cell, 0) < parties) Atomics.wait(cell, 0, Atomics.load(cell, 0), 50);
  };
}

async function runThroughput(kind, options, parallel, procs) {
  const shares = Array.from({ length: procs }, (_, i) => Math.floor(parallel / procs) + (i < parallel % procs ? 1 : 0))
    .filter((n) => n > 0);
  const param = kind === 'rpc' ? 'connections' : 'concurrency';
  const circle = options.circle ?? newKey().pubkey;
  let parts;
  if (shares.length === 1) {
    parts = [await THROUGHPUT[kind]({ ...options, circle, [param]: shares[0] })];
  } else {
    const buffer = new SharedArrayBuffer(4);
    parts = await Promise.all(shares.map((n, i) => new Promise((resolve) => {
      const worker = new Worker(new URL(import.meta.url), { workerData: {
        kind, buffer, parties: shares.length,
        options: { ...options, circle, [param]: n, serverPid: i === 0 ? options.serverPid : null,
                   markWindow: i === 0 && options.markWindow } } });
      worker.once('message', resolve);
      worker.once('error', (e) => resolve({ latencies: [], errors: 1, last_error: describe(e), window: {} }));
    })));
  }
  const latencies = parts.flatMap((p) => p.latencies);
  const out = {
    workload: kind, ...(kind === 'rpc' ? { method: options.method } : {}), client: CLIENT, generator: 'node',
    [param]: parallel, procs: shares.length, duration_s: options.duration, warmup_s: options.warmup,
    ops: latencies.length, ops_per_s: round(latencies.length / options.duration, 1),
    errors: parts.reduce((a, p) => a + p.errors, 0), ...latencySummary(latencies),
  };
  const lastErrors = parts.map((p) => p.last_error).filter(Boolean);
  if (lastErrors.length) out.last_error = lastErrors[lastErrors.length - 1];
  if (kind === 'auth') {
    const signs = parts.filter((p) => 'client_sign_us' in p).map((p) => p.client_sign_us);
    out.client_sign_us = round(signs.reduce((a, b) => a + b, 0) / Math.max(1, signs.length), 1);
  }
  const window = parts[0].window ?? {};
  const wall = window.wall_s || options.duration;
  if ('server_cpu_s' in window) {
    out.server_cpu_util = round(window.server_cpu_s / wall, 3);
    if ('others_on_server_cpu' in window) out.others_on_server_cpu = window.others_on_server_cpu;
    if (latencies.length) out.server_cpu_us_per_op = round((window.server_cpu_s / latencies.length) * 1e6, 1);
  }
  // process.cpuUsage() counts every thread of this process: the first part's window has them all.
  out.client_cpu_util = round((window.client_cpu_s ?? 0) / wall, 3);
  return out;
}

// --- workload: idle --------------------------------------------------------------------------

async function openMany(url, circle, count, batch) {
  const opened = [];
  const errors = [];
  let failures = 0;
  for (let start = 0; start < count; start += batch) {
    const n = Math.min(batch, count - start);
    const results = await Promise.allSettled(Array.from({ length: n }, () => open(url, circle)));
    for (const r of results) {
      if (r.status === 'fulfilled') {
        opened.push(r.value);
      } else {
        failures += 1;
        if (errors.length < 3) errors.push(describe(r.reason).slice(0, 200));
      }
    }
  }
  return { opened, failures, errors };
}

async function askAll(sockets, method = 'whoami') {
  const ask = async (ws) => {
    try {
      ws.send(`{"jsonrpc":"2.0","id":1,"method":"${method}"}`);
      return (await withTimeout(ws.recv(), 30, method)).includes('"result"');
    } catch {
      return false;
    }
  };
  let ok = 0;
  for (let start = 0; start < sockets.length; start += 1000) {
    ok += (await Promise.all(sockets.slice(start, start + 1000).map(ask))).filter(Boolean).length;
  }
  return ok;
}

async function closeAll(sockets, batch) {
  for (let start = 0; start < sockets.length; start += batch) {
    await Promise.all(sockets.slice(start, start + batch).map((ws) => ws.close()));
  }
}

async function idle({ url, count, batch, hold, serverPid, settle, circle }) {
  circle ??= newKey().pubkey;
  const warm = await openMany(url, circle, Math.min(batch, 100), batch); // warm the server's code paths
  await askAll(warm.opened);
  await closeAll(warm.opened, batch);
  await sleep(settle);
  const rssBefore = rssBytes(serverPid);
  const t0 = now();
  const { opened, failures, errors } = await openMany(url, circle, count, batch);
  const openS = now() - t0;
  await sleep(settle);
  const rssOpen = rssBytes(serverPid);
  await sleep(hold);
  const alive = await askAll(opened); // every held connection must still answer after the hold
  const rssUsed = rssBytes(serverPid);
  const t1 = now();
  await closeAll(opened, batch);
  const closeS = now() - t1;
  await sleep(settle);
  const rssClosed = rssBytes(serverPid);
  const out = {
    workload: 'idle', generator: 'node', target: count, batch, opened: count - failures, open_failures: failures,
    open_s: round(openS, 2), connects_per_s: round((count - failures) / openS, 1), hold_s: hold,
    alive_after_hold: alive, close_s: round(closeS, 2),
  };
  if (errors.length) out.first_errors = errors;
  if (rssBefore !== null) {
    const held = Math.max(1, count - failures);
    Object.assign(out, {
      server_rss_before_mb: round(rssBefore / 2 ** 20, 1), server_rss_open_mb: round(rssOpen / 2 ** 20, 1),
      server_rss_after_one_call_mb: round(rssUsed / 2 ** 20, 1),
      server_rss_after_close_mb: round(rssClosed / 2 ** 20, 1),
      server_bytes_per_idle_conn: Math.round((rssOpen - rssBefore) / held),
      server_bytes_per_conn_after_call: Math.round((rssUsed - rssBefore) / held),
    });
  }
  return out;
}

// --- workload: churn -------------------------------------------------------------------------

async function churn({ url, rounds, perRound, concurrency, serverPid, settle, circle }) {
  circle ??= newKey().pubkey;
  const request = `{"jsonrpc":"2.0","id":1,"method":"fetch_nonce","params":{"pubkey":"${newKey().pubkey}"}}`;
  const perRoundOut = [];
  let errors = 0;
  let lastError = null;
  const rss0 = rssBytes(serverPid);
  for (let roundNo = 1; roundNo <= rounds; roundNo++) {
    let remaining = perRound;
    const t0 = now();
    const worker = async () => {
      while (remaining > 0) {
        remaining -= 1;
        try {
          const ws = await open(url, circle);
          try {
            ws.send(request);
            if (!(await ws.recv()).includes('"nonce"')) throw new Error('no nonce in reply');
          } finally {
            await ws.close();
          }
        } catch (e) {
          errors += 1;
          lastError = describe(e).slice(0, 200);
        }
      }
    };
    await withTimeout(Promise.all(Array.from({ length: concurrency }, worker)), 600, 'churn round');
    const wall = now() - t0;
    await sleep(settle);
    const rss = rssBytes(serverPid);
    perRoundOut.push({ round: roundNo, wall_s: round(wall, 2), connects_per_s: round(perRound / wall, 1),
                       server_rss_mb: rss === null ? null : round(rss / 2 ** 20, 1) });
    process.stderr.write(`  churn round ${roundNo}: ${Math.round(perRound / wall)} conn/s, rss `
                         + `${perRoundOut[perRoundOut.length - 1].server_rss_mb} MB\n`);
  }
  const out = { workload: 'churn', generator: 'node', rounds, per_round: perRound, concurrency, errors,
                per_round_results: perRoundOut };
  if (lastError) out.last_error = lastError;
  if (rss0 !== null) {
    const first = perRoundOut[0].server_rss_mb;
    const last = perRoundOut[perRoundOut.length - 1].server_rss_mb;
    Object.assign(out, {
      server_rss_start_mb: round(rss0 / 2 ** 20, 1), server_rss_round1_mb: first, server_rss_last_mb: last,
      last_over_round1: round(last / first, 3), growth_after_round1_mb: round(last - first, 1),
      growth_bytes_per_conn_after_round1: round(((last - first) * 2 ** 20) / Math.max(1, (rounds - 1) * perRound), 1),
    });
  }
  return out;
}

// --- workload: play --------------------------------------------------------------------------

/** The open loop of play --rate: `rate` plays a second over `sockets`, in turn. */
async function pacedPlays(sockets, rate, duration, warmup) {
  const MAX_WAITING = 50;  // the server's --max-plays is 100 a connection
  const latencies = [];
  const sentAt = sockets.map(() => new Map());  // id -> send time, a map a connection
  let measuring = false;
  let errors = 0;
  let behind = 0;
  let lastError = null;
  let nextId = 2;
  const readers = sockets.map(async (ws, i) => {
    for (;;) {
      let reply;
      try {
        reply = await ws.recv();
      } catch {
        return;  // closed at the end
      }
      const { id, result, error } = JSON.parse(reply);
      const t0 = sentAt[i].get(id);
      sentAt[i].delete(id);
      if (result === undefined) {
        errors += 1;
        lastError = `play failed: ${JSON.stringify(error).slice(0, 200)}`;
      } else if (measuring && t0 !== undefined && t0.measured) {
        latencies.push(now() - t0.time);
      }
    }
  });
  let sent = 0;
  const started = now();
  let windowStart = null;
  let windowEnd = null;
  await new Promise((resolve) => {
    const tick = setInterval(() => {
      const t = now();
      if (windowStart === null && t - started >= warmup) {
        windowStart = t;
        measuring = true;
        process.stderr.write('window start\n');
      }
      if (windowStart !== null && t - windowStart >= duration) {
        windowEnd = t;
        measuring = false;
        process.stderr.write('window end\n');
        clearInterval(tick);
        resolve();
        return;
      }
      const due = Math.floor(rate * (t - started));
      for (; sent < due; sent++) {
        const i = sent % sockets.length;
        if (sentAt[i].size >= MAX_WAITING) {
          behind += 1;
          continue;
        }
        const id = nextId++;
        sentAt[i].set(id, { time: now(), measured: measuring });
        sockets[i].send(`{"jsonrpc":"2.0","method":"play","params":{"script":"40 + 2"},"id":${id}}`);
      }
    }, 1);
  });
  const waited = now();
  while (sentAt.some((m) => m.size) && now() - waited < 30) await sleep(0.01);
  return { latencies, elapsed: windowEnd - windowStart, errors, behind, lastError, readers };
}

async function play({ url, circle, connections, duration, warmup, rate }) {
  if (!circle) throw new Error('play needs --circle (the circle the server serves and a worker runs)');
  const latencies = [];
  let measuring = false;
  let stop = false;
  let errors = 0;
  let lastError = null;

  async function session() {
    const key = newKey();
    const ws = await open(url, circle, false);
    ws.send(JSON.stringify({ jsonrpc: '2.0', method: 'fetch_nonce', params: { pubkey: key.pubkey }, id: 0 }));
    const nonce = JSON.parse(await ws.recv()).result.nonce;
    ws.send(JSON.stringify({ jsonrpc: '2.0', method: 'authenticate', id: 1,
                             params: { pubkey: key.pubkey, signature: signPersonal(key.secret, nonce) } }));
    const reply = JSON.parse(await ws.recv());
    if (!reply.result?.authenticated) throw new Error(`not authenticated: ${JSON.stringify(reply).slice(0, 200)}`);
    return ws;
  }

  async function loop(ws) {
    for (let i = 2; !stop; i++) {
      const t0 = now();
      ws.send(`{"jsonrpc":"2.0","method":"play","params":{"script":"40 + 2"},"id":${i}}`);
      const reply = await ws.recv();
      if (!reply.includes('"result"')) {
        errors += 1;
        lastError = `play failed: ${reply.slice(0, 200)}`;
        continue;
      }
      if (measuring) latencies.push(now() - t0);
    }
  }

  const sockets = await Promise.all(Array.from({ length: connections }, session));
  if (rate > 0) {
    const paced = await pacedPlays(sockets, rate, duration, warmup);
    await Promise.all(sockets.map((ws) => ws.close()));
    await withTimeout(Promise.all(paced.readers), 30, 'play readers');
    return playResult(connections, paced.latencies, paced.elapsed, paced.errors, paced.lastError,
                      { rate, behind: paced.behind });
  }
  const loops = Promise.all(sockets.map(loop));
  await sleep(warmup);
  measuring = true;
  process.stderr.write('window start\n');
  const started = now();
  await sleep(duration);
  const elapsed = now() - started;
  measuring = false;
  process.stderr.write('window end\n');
  const measured = latencies.slice();
  stop = true;
  await withTimeout(loops, 60, 'play');
  await Promise.all(sockets.map((ws) => ws.close()));
  return playResult(connections, measured, elapsed, errors, lastError);
}

function playResult(connections, measured, elapsed, errors, lastError, extra = {}) {
  const sorted = Float64Array.from(measured).sort();
  // bench/play.py's percentiles: the value at index floor(p * n), in ms to two decimals.
  const pct = (p) => (sorted.length ? round(sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] * 1000, 2)
    : null);
  const out = { workload: 'play', generator: 'node', connections, seconds: round(elapsed, 2),
                plays: measured.length, plays_per_s: round(measured.length / elapsed, 1),
                p50_ms: pct(0.5), p90_ms: pct(0.9), p99_ms: pct(0.99), errors, ...extra };
  if (lastError) out.last_error = lastError;
  return out;
}

// --- command line ----------------------------------------------------------------------------

function summary(result) {
  const kind = result.workload;
  if (kind === 'rpc' || kind === 'auth') {
    const what = kind === 'rpc' ? `${result.method} calls/s` : 'handshakes/s';
    let line = `${kind} x${result.connections ?? result.concurrency}: ${Math.round(result.ops_per_s)} ${what}, `
      + `p50 ${result.p50_ms} ms, p99 ${result.p99_ms} ms, errors ${result.errors}`;
    if ('server_cpu_util' in result) line += `, server CPU ${Math.round(result.server_cpu_util * 100)}%`;
    if ('others_on_server_cpu' in result) line += ` (others on its CPU ${Math.round(result.others_on_server_cpu * 100)}%)`;
    return line + `, client CPU ${Math.round(result.client_cpu_util * 100)}%`;
  }
  if (kind === 'idle') {
    return `idle: ${result.opened}/${result.target} held, ${result.alive_after_hold} alive after hold, `
      + `${result.server_bytes_per_idle_conn ?? '?'} B/conn server RSS`;
  }
  if (kind === 'play') {
    const paced = result.rate ? ` (offered ${result.rate}/s, ${result.behind} behind)` : '';
    return `play x${result.connections}: ${Math.round(result.plays_per_s)} plays/s${paced}, p50 ${result.p50_ms} ms, `
      + `p99 ${result.p99_ms} ms, errors ${result.errors}`;
  }
  return `churn: ${result.rounds}x${result.per_round}, rss round1 ${result.server_rss_round1_mb} MB, `
    + `last ${result.server_rss_last_mb} MB (x${result.last_over_round1}), errors ${result.errors}`;
}

function versions() {
  const require = createRequire(import.meta.url);
  const of = (name) => { // read directly: a package's "exports" may not list its package.json
    for (const dir of require.resolve.paths(name) ?? []) {
      try {
        return JSON.parse(readFileSync(join(dir, name, 'package.json'), 'utf8')).version;
      } catch {
        // not in this directory
      }
    }
    return null;
  };
  return { node: process.versions.node, ws: of('ws'), 'tiny-secp256k1': of('tiny-secp256k1'),
           '@noble/hashes': of('@noble/hashes') };
}

const USAGE = 'usage: loadgen.mjs rpc|auth|idle|churn|play --url ws://HOST:PORT [options] | --check';

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv, allowPositionals: true, strict: true,
      options: {
        url: { type: 'string' }, 'server-pid': { type: 'string' }, circle: { type: 'string' },
        connections: { type: 'string', default: '1' }, method: { type: 'string', default: 'fetch_nonce' },
        concurrency: { type: 'string', default: '20' }, duration: { type: 'string', default: '10' },
        warmup: { type: 'string', default: '2' }, procs: { type: 'string', default: '1' },
        rate: { type: 'string', default: '0' },
        count: { type: 'string', default: '10000' }, batch: { type: 'string', default: '50' },
        hold: { type: 'string', default: '5' }, rounds: { type: 'string', default: '10' },
        'per-round': { type: 'string', default: '10000' }, settle: { type: 'string', default: '1' },
        check: { type: 'boolean', default: false }, 'mark-window': { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (e) {
    throw new UsageError(`${e.message}\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return null;
  }
  if (values.check) return versions();
  const workload = positionals[0];
  if (positionals.length !== 1 || !['rpc', 'auth', 'idle', 'churn', 'play'].includes(workload)) throw new UsageError(USAGE);
  if (!values.url || !/^wss?:\/\//.test(values.url)) throw new UsageError('--url ws://host:port is required');
  if (!['fetch_nonce', 'whoami'].includes(values.method)) throw new UsageError('--method: fetch_nonce or whoami');
  const number = (name, integer = true) => {
    const value = Number(values[name]);
    if (!Number.isFinite(value) || value < 0 || (integer && !Number.isInteger(value))) {
      throw new UsageError(`--${name}: expected a ${integer ? 'whole ' : ''}number >= 0, got ${values[name]}`);
    }
    return value;
  };
  const options = {
    url: values.url.replace(/\/+$/, ''), serverPid: values['server-pid'] ? number('server-pid') : null,
    circle: values.circle ?? null, method: values.method, duration: number('duration', false),
    warmup: number('warmup', false), settle: number('settle', false), hold: number('hold', false),
    markWindow: values['mark-window'],
  };
  const overflows = listenOverflows();
  let result;
  if (workload === 'rpc' || workload === 'auth') {
    const parallel = workload === 'rpc' ? number('connections') : number('concurrency');
    result = await runThroughput(workload, options, parallel, Math.max(1, number('procs')));
  } else if (workload === 'idle') {
    result = await idle({ ...options, count: number('count'), batch: Math.max(1, number('batch')) });
  } else if (workload === 'churn') {
    result = await churn({ ...options, rounds: Math.max(1, number('rounds')), perRound: number('per-round'),
                           concurrency: Math.max(1, number('concurrency')) });
  } else {
    result = await play({ ...options, connections: Math.max(1, number('connections')), rate: number('rate', false) });
  }
  if (overflows !== null) {
    // Non-zero: connects waited for SYN retransmits because the server's accept backlog was full;
    // the rates then measure the backlog, not the server.
    result.listen_overflows = listenOverflows() - overflows;
  }
  process.stderr.write(summary(result) + '\n');
  return result;
}

class UsageError extends Error {}

if (!isMainThread) {
  // One share of rpc/auth in a thread of its own (--procs).
  const { kind, buffer, parties, options } = workerData;
  THROUGHPUT[kind]({ ...options, barrier: async () => sharedBarrier(buffer, parties)() })
    .catch((e) => ({ latencies: [], errors: 1, last_error: describe(e), window: {} }))
    .then((part) => parentPort.postMessage(part));
} else {
  main(process.argv.slice(2)).then(
    (result) => {
      if (result === null) process.exit(0);
      process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
    },
    (e) => {
      process.stderr.write((e instanceof UsageError ? e.message : `loadgen.mjs: ${describe(e)}`) + '\n');
      process.exit(e instanceof UsageError ? 2 : 1);
    },
  );
}
