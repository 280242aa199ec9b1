// Runs the worked example against a real vectord started for the test (node --test).
// The binary is $VECTORD_BIN, else target/debug/vectord, else target/release/vectord.
"use strict";
const { test } = require("node:test");
const assert = require("node:assert");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { spawn } = require("node:child_process");
const readline = require("node:readline");
const grpc = require("@grpc/grpc-js");
const example = require("./example");

const ROOT = path.join(__dirname, "..", "..");

function binary() {
  for (const c of [process.env.VECTORD_BIN, "target/debug/vectord", "target/release/vectord"]) {
    if (c && fs.existsSync(path.resolve(ROOT, c))) return path.resolve(ROOT, c);
  }
  throw new Error("no vectord binary: run `cargo build` first or set VECTORD_BIN");
}

function startServer(...flags) {
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "vectord-node-"));
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("VECTORD_")));
  const proc = spawn(binary(), ["serve", "--addr", "127.0.0.1:0", "--data-dir", data, ...flags], { stdio: ["ignore", "ignore", "pipe"], env });
  // The data dir goes with the server ("close" comes after "exit", whose listeners stop() replaces).
  proc.once("close", () => fs.rmSync(data, { recursive: true, force: true }));
  const lines = readline.createInterface({ input: proc.stderr });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("vectord did not start within 60 s")), 60000);
    let addr;
    lines.on("line", (line) => {
      const m = /vectord listening addr=(\S+)/.exec(line);
      if (m) addr = m[1];
      if (addr && /vectord is serving/.test(line)) {
        clearTimeout(timer);
        resolve({ addr, proc });
      }
    });
    proc.on("exit", (code) => reject(new Error(`vectord exited with ${code}`)));
  });
}

function stop(proc) {
  return new Promise((resolve) => {
    proc.removeAllListeners("exit");
    proc.on("exit", (code) => resolve(code));
    proc.kill("SIGTERM");
  });
}

test("create, import, streamed autotune, promote, search", async () => {
  const { addr, proc } = await startServer();
  try {
    const printed = [];
    const { events, promoted, hits } = await example.run(addr, { out: (l) => printed.push(l) });
    // Progress events may come between the others (the job reports long builds).
    assert.deepStrictEqual(events.map((e) => e.event).filter((k) => k !== "progress"), ["started", "trial", "trial", "trial", "trial", "trial", "finished"]);
    const fin = events.at(-1).finished;
    assert.ok(fin.promoted);
    assert.match(fin.promotion.note, /^autotune winner: recall=/);
    assert.strictEqual(promoted.history_depth, 1);
    assert.strictEqual(hits.neighbors[0].id, "42");
    assert.ok(printed.some((l) => l.startsWith("trial ")));

    // Errors carry their gRPC codes.
    const v1 = example.load();
    const c = new v1.IndexService(addr, grpc.credentials.createInsecure());
    await assert.rejects(example.unary(c, "GetIndex", { name: "nope" }), (e) => e.code === grpc.status.NOT_FOUND);
    await assert.rejects(example.unary(c, "CreateIndex", { name: "bad name", dimension: 4, metric: "METRIC_L2" }), (e) => e.code === grpc.status.INVALID_ARGUMENT);
    c.close();
  } finally {
    assert.strictEqual(await stop(proc), 0);
  }
});

test("API keys: none is UNAUTHENTICATED, read-only reads, admin runs the example", async () => {
  const { addr, proc } = await startServer("--api-key", "node-admin-key", "--read-only-api-key", "node-reader-key");
  const v1 = example.load();
  const client = (apiKey) => {
    const { creds, options } = example.connection({ apiKey, tlsCa: "" });
    return new v1.IndexService(addr, creds, options);
  };
  const none = client("");
  const reader = client("node-reader-key");
  try {
    await assert.rejects(example.unary(none, "ListIndexes", {}), (e) => e.code === grpc.status.UNAUTHENTICATED);
    const listed = await example.unary(reader, "ListIndexes", {});
    assert.deepStrictEqual(listed.indexes, []);
    await assert.rejects(
      example.unary(reader, "CreateIndex", { name: "x", dimension: 4, metric: "METRIC_L2" }),
      (e) => e.code === grpc.status.PERMISSION_DENIED,
    );
    const { hits } = await example.run(addr, { apiKey: "node-admin-key", out: () => {} });
    assert.strictEqual(hits.neighbors[0].id, "42");
  } finally {
    none.close();
    reader.close();
    assert.strictEqual(await stop(proc), 0);
  }
});

test("several addresses: a dead one is skipped, and a stopped node fails over to the next", async () => {
  const a = await startServer();
  const b = await startServer();
  const v1 = example.load();
  const clients = [];
  const indexesOf = async (target) => {
    const { target: t, options } = await example.resolveTarget(target);
    const c = new v1.IndexService(t, grpc.credentials.createInsecure(), options);
    clients.push(c);
    return c;
  };
  const names = (c, wait) =>
    new Promise((resolve, reject) =>
      c.ListIndexes({}, { deadline: Date.now() + 10000, waitForReady: wait }, (err, res) => (err ? reject(err) : resolve(res.indexes.map((i) => i.name)))),
    );
  let aRunning = true;
  try {
    const onA = await indexesOf(a.addr);
    await example.unary(onA, "CreateIndex", { name: "only_on_a", dimension: 4, metric: "METRIC_L2" });
    // Nothing listens on `dead` (bound, then closed): the channel goes on to the next node.
    const dead = await new Promise((resolve) => {
      const srv = require("node:net").createServer();
      srv.listen(0, "127.0.0.1", () => {
        const port = srv.address().port;
        srv.close(() => resolve(`127.0.0.1:${port}`));
      });
    });
    assert.deepStrictEqual(await names(await indexesOf(`${dead},${a.addr}`)), ["only_on_a"]);
    // Two live nodes: the first is used; once it is gone, the next call goes to the other.
    const both = await indexesOf([a.addr, b.addr]);
    assert.deepStrictEqual(await names(both), ["only_on_a"]);
    assert.strictEqual(await stop(a.proc), 0);
    aRunning = false;
    const deadline = Date.now() + 30000;
    for (;;) {
      try {
        // waitForReady: the call waits for the channel to reach a node, no busy loop.
        assert.deepStrictEqual(await names(both, true), [], "answered by the stopped node");
        break;
      } catch (e) {
        // The call that finds the first node gone may fail; the next one reconnects.
        if (e.code !== grpc.status.UNAVAILABLE || Date.now() > deadline) throw e;
      }
    }
  } finally {
    for (const c of clients) c.close();
    if (aRunning) await stop(a.proc);
    assert.strictEqual(await stop(b.proc), 0);
  }
});
