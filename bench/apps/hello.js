// Hello-world HTTP server of the benchmark, the reference point of the Node world.
//
//   PORT=8000 node hello.js                         one process
//   PORT=8000 BENCH_CLUSTER_WORKERS=2 node hello.js  a cluster master with 2 workers
//   pm2-runtime start hello.js -i 2                  PM2 cluster mode (PM2 is the master)
//
// Every response names its process (x-worker-pid), so a client can count each worker's
// share. Under PM2 the script runs as a cluster worker too, so "am I the master" is
// decided by BENCH_CLUSTER_WORKERS, not by cluster.isPrimary.
"use strict";
const cluster = require("node:cluster");
const http = require("node:http");

const PORT = Number(process.env.PORT || 8000);
const WORKERS = Number(process.env.BENCH_CLUSTER_WORKERS || 0);
const BODY = Buffer.from("Hello, world!\n");
// A worker that was told to stop gets this long to finish; then it exits anyway.
const DRAIN_LIMIT_MS = 10000;

function serve() {
  let draining = false;
  const pid = String(process.pid);
  const answer = (res) => {
    // While draining, every response asks its keep-alive client to reconnect, so that
    // clients move to a sibling after their next response instead of losing a request
    // to a connection closed under them.
    res.writeHead(200, {
      "content-type": "text/plain",
      "content-length": BODY.length,
      "x-worker-pid": pid,
      ...(draining ? { connection: "close" } : {}),
    });
    res.end(BODY);
  };
  const server = http.createServer((req, res) => answer(res));
  server.listen(PORT, "127.0.0.1");

  const drain = () => {
    if (draining) return;
    draining = true;
    server.close(() => process.exit(0));
    // Connections that stay idle get no response to carry the close: close them once
    // the clients that were busy had time to leave.
    setTimeout(() => server.closeIdleConnections(), 1000);
    setTimeout(() => process.exit(0), DRAIN_LIMIT_MS).unref();
  };
  process.on("SIGINT", drain); // PM2's reload and stop
  process.on("SIGTERM", drain);
  process.on("message", (msg) => { if (msg === "shutdown") drain(); });
}

// The rolling restart of the cluster master on SIGHUP: one worker at a time, start its
// successor, wait until it listens, then tell the old one to drain and wait for it to go.
function master() {
  let rolling = false;
  const retiring = new Set();

  const spawn = () => new Promise((resolve) => {
    const worker = cluster.fork();
    worker.once("listening", () => resolve(worker));
  });

  const retire = (worker) => new Promise((resolve) => {
    retiring.add(worker.id);
    worker.once("exit", resolve);
    worker.send("shutdown");
  });

  const roll = async () => {
    if (rolling) return;
    rolling = true;
    for (const old of Object.values(cluster.workers)) {
      await spawn();
      await retire(old);
    }
    rolling = false;
  };

  // A worker that died unasked (a crash, kill -9) is replaced at once.
  cluster.on("exit", (worker) => {
    if (!retiring.delete(worker.id)) cluster.fork();
  });
  process.on("SIGHUP", roll);
  for (let i = 0; i < WORKERS; i++) cluster.fork();
}

if (WORKERS > 0 && cluster.isPrimary) master();
else serve();
