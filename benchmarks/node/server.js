#!/usr/bin/env node
// The grpc-js peer: @grpc/grpc-js server + grpc-health-check's HealthImplementation,
// the stock Node health service. Uses the repository's root node_modules.
//
//   node benchmarks/node/server.js [port]
//
// Logs "serving on 127.0.0.1:PORT" on stderr; SIGTERM stops it.
'use strict';

const grpc = require('@grpc/grpc-js');
const { HealthImplementation } = require('grpc-health-check');

const port = Number(process.argv[2] || 0);
const server = new grpc.Server();
const health = new HealthImplementation({ '': 'SERVING', readiness: 'SERVING' });
health.addToServer(server);
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (error, bound) => {
  if (error) {
    process.stderr.write(`error: ${error.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`serving on 127.0.0.1:${bound}\n`);
});
process.on('SIGTERM', () => {
  server.forceShutdown();
  process.exit(0);
});
