// A worked example of vectord from Node.js: create an index, import points (client stream),
// make a harness, run a streamed autotune printing each trial as it arrives, promote, search.
//
//   node example.js [host:port[,host:port...]]   # default 127.0.0.1:50051; several: failover
//
// With VECTORD_API_KEY set (or { apiKey }), every call carries `authorization: Bearer <key>`;
// with VECTORD_TLS_CA set to a CA file (or { tlsCa }), the connection is TLS.
"use strict";
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.join(__dirname, "..", "..", "proto");

function load() {
  const files = ["index", "autotune", "promotion"].map((f) => `vectord/v1/${f}.proto`);
  // longs as strings: ids and counts are uint64.
  const def = protoLoader.loadSync(files, { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
  return grpc.loadPackageDefinition(def).vectord.v1;
}

const unary = (client, method, req) =>
  new Promise((resolve, reject) => client[method](req, (err, res) => (err ? reject(err) : resolve(res))));

function importPoints(client, index, points, size = 100) {
  return new Promise((resolve, reject) => {
    const call = client.ImportPoints((err, res) => (err ? reject(err) : resolve(res)));
    for (let start = 0; start < points.length; start += size) {
      // The first message names the index.
      call.write({ index_name: start === 0 ? index : "", points: points.slice(start, start + size) });
    }
    call.end();
  });
}

function autotune(client, req, onEvent) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.Autotune(req);
    call.on("data", (e) => {
      events.push(e);
      onEvent(e);
    });
    call.on("error", reject);
    call.on("end", () => resolve(events));
  });
}

// Credentials and client options for vectord: TLS with a private CA, and the API key on every
// call (an interceptor, so it works on plaintext channels too).
function connection({ apiKey = process.env.VECTORD_API_KEY, tlsCa = process.env.VECTORD_TLS_CA } = {}) {
  const creds = tlsCa ? grpc.credentials.createSsl(require("node:fs").readFileSync(tlsCa)) : grpc.credentials.createInsecure();
  const interceptors = [];
  if (apiKey) {
    interceptors.push(
      (options, nextCall) =>
        new grpc.InterceptingCall(nextCall(options), {
          start(metadata, listener, next) {
            metadata.set("authorization", `Bearer ${apiKey}`);
            next(metadata, listener);
          },
        }),
    );
  }
  return { creds, options: { interceptors } };
}

// The gRPC target for `target`: "host:port", or several nodes of a cluster separated by commas
// (or an array). Several become gRPC's static address list ("ipv4:a,b" — literal addresses
// only, so host names are resolved here, in the order given) with pick_first: the channel uses
// the first node that accepts a connection and, when it goes away, the next one. A call in
// flight when its node goes away fails with UNAVAILABLE; the next call goes to the next node.
// Writes carry request_id, so retrying one is safe. Returns { target, options } (options: the
// channel options that go with it).
async function resolveTarget(target) {
  const net = require("node:net");
  const dns = require("node:dns").promises;
  const items = (Array.isArray(target) ? target : String(target).split(",")).map((t) => t.trim()).filter(Boolean);
  if (items.length === 0) throw new Error("no vectord address given");
  if (items.length === 1) return { target: items[0], options: {} };
  const addrs = [];
  for (const item of items) {
    const i = item.lastIndexOf(":");
    const host = item.slice(0, i).replace(/^\[|\]$/g, "");
    const port = item.slice(i + 1);
    const ips = net.isIP(host) ? [host] : (await dns.lookup(host, { all: true })).map((a) => a.address);
    for (const ip of ips) addrs.push(net.isIPv6(ip) ? `[${ip}]:${port}` : `${ip}:${port}`);
  }
  const scheme = addrs.some((a) => a.startsWith("[")) ? "ipv6" : "ipv4";
  return {
    target: `${scheme}:${addrs.join(",")}`,
    // The certificate is checked against the first node's name, not an address.
    options: { "grpc.default_authority": items[0], "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ pick_first: {} }] }) },
  };
}

async function run(target, { index = "node_example", n = 300, dim = 16, out = console.log, apiKey, tlsCa } = {}) {
  const v1 = load();
  const resolved = await resolveTarget(target);
  target = resolved.target;
  const connected = connection({ apiKey, tlsCa });
  const creds = connected.creds;
  const options = { ...connected.options, ...resolved.options };
  const indexes = new v1.IndexService(target, creds, options);
  const tune = new v1.AutotuneService(target, creds, options);
  const promotions = new v1.PromotionService(target, creds, options);
  try {
    await unary(indexes, "CreateIndex", { name: index, dimension: dim, metric: "METRIC_COSINE" });
    let seed = 7;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1;
    const points = Array.from({ length: n }, (_, i) => ({ id: String(i + 1), vector: Array.from({ length: dim }, rand) }));
    const imported = await importPoints(indexes, index, points);
    out(`imported ${imported.upserted_count} points (index now has ${imported.point_count})`);

    await unary(tune, "CreateHarness", { index_name: index, name: "smoke", k: 10, sampled: { query_count: 20, seed: "42" } });
    const events = await autotune(tune, { index_name: index, harness: "smoke", min_recall: 0.9, requested_by: "node" }, (e) => {
      if (e.event === "started") out(`job ${e.started.job_id}: ${e.started.grid.length} configs`);
      else if (e.event === "trial") {
        const t = e.trial;
        out(`trial ${t.id}: ef_construction=${t.config.ef_construction} ef_search=${t.config.ef_search} recall=${t.recall.toFixed(3)} p50=${t.p50_micros.toFixed(1)}us`);
      } else if (e.event === "progress") {
        // At most 2 a second while the job builds or measures (long trials on big indexes).
        for (const a of e.progress.activities) {
          const phase = a.phase.replace("PROGRESS_PHASE_", "").toLowerCase();
          out(`  ${phase} m=${a.config ? a.config.m : "-"} ef_construction=${a.config ? a.config.ef_construction : "-"}: ${a.done}/${a.total}`);
        }
      } else if (e.event === "finished") out(`winner trial ${e.finished.winner.id} promoted=${e.finished.promoted} ${e.finished.reason}`);
      // Any other event is from a newer server: ignore it.
    });

    const trials = events.filter((e) => e.event === "trial").map((e) => e.trial);
    const best = Math.max(...trials.map((t) => t.recall));
    const fastest = trials.filter((t) => t.recall === best).sort((a, b) => a.p50_micros - b.p50_micros)[0];
    const promoted = await unary(promotions, "Promote", { index_name: index, trial_id: fastest.id, promoted_by: "node", note: "fastest at best recall" });
    out(`promoted trial ${promoted.current.trial_id}; history depth ${promoted.history_depth}`);

    const hits = await unary(indexes, "Search", { index_name: index, vector: points[41].vector, k: 3 });
    out("search: " + hits.neighbors.map((h) => `${h.id} (${h.distance.toFixed(3)})`).join(", "));
    return { events, promoted, hits };
  } finally {
    indexes.close();
    tune.close();
    promotions.close();
  }
}

module.exports = { run, load, unary, connection, resolveTarget };

if (require.main === module) {
  run(process.argv[2] || "127.0.0.1:50051").catch((e) => {
    console.error(`error: ${e.code} ${e.details || e.message}`);
    process.exit(1);
  });
}
