#!/usr/bin/env node
// A grpc.health.v1 server on Node's @grpc/grpc-js (grpc-health-check's stock
// HealthImplementation), for the probe's interop tests (tests/test_probe.py).
//
//   node health_server.js [CERT KEY]
//
// Listens on 127.0.0.1 on a free port, plaintext or (with CERT and KEY) TLS, and prints
// "serving on 127.0.0.1:PORT" on stdout. Statuses: "" and liveness SERVING, readiness
// NOT_SERVING; any other name is unknown (NOT_FOUND). SIGTERM stops it.
'use strict';

const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const { HealthImplementation } = require('grpc-health-check');

const [cert, key] = process.argv.slice(2);
const credentials = cert
  ? grpc.ServerCredentials.createSsl(null, [
      { cert_chain: fs.readFileSync(cert), private_key: fs.readFileSync(key) },
    ])
  : grpc.ServerCredentials.createInsecure();
const server = new grpc.Server();
const health = new HealthImplementation({
  '': 'SERVING',
  liveness: 'SERVING',
  readiness: 'NOT_SERVING',
});
health.addToServer(server);
server.bindAsync('127.0.0.1:0', credentials, (error, port) => {
  if (error) {
    process.stderr.write(`error: ${error.message}\n`);
    process.exit(2);
  }
  process.stdout.write(`serving on 127.0.0.1:${port}\n`);
});
process.on('SIGTERM', () => {
  server.forceShutdown();
  process.exit(0);
});
