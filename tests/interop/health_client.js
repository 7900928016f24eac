#!/usr/bin/env node
// A grpc.health.v1 client on Node's @grpc/grpc-js, for interop tests against the
// Python server (tests/test_interop_node.py). Prints one JSON object per line on stdout.
//
//   node health_client.js check   <addr> <service>
//   node health_client.js watch   <addr> <service> <n>
//   node health_client.js list    <addr>
//   node health_client.js kubelet <addr> <service> <count>
//
// Statuses are enum names ("SERVING", ...); errors carry the numeric gRPC code.
// Exit codes: 0 the command completed (whatever the RPC answered; see the JSON),
// 1 watch ended or timed out before n statuses, 2 bad arguments.
'use strict';

const net = require('net');

// The kubelet model must open one TCP connection per probe. grpc-js pools subchannels
// (connections) across channels unless told otherwise, so count real connects here
// rather than trust the channel options. grpc-js calls net.connect through the module.
let tcpConnects = 0;
const originalConnect = net.connect;
net.connect = function countedConnect(...args) {
  tcpConnects += 1;
  return originalConnect.apply(this, args);
};

const grpc = require('@grpc/grpc-js');
// grpc-health-check ships health.proto (with List) and exports the loaded service
// definition; use it rather than a copy of the proto.
const { service: healthService } = require('grpc-health-check');

const HealthClient = grpc.makeGenericClientConstructor(healthService, 'Health');
const RPC_TIMEOUT_MS = 5000;
const WATCH_TIMEOUT_MS = 30000;
const KUBELET_TIMEOUT_MS = 1000;
const KUBELET_USER_AGENT = 'kube-probe/1.31';

function emit(object) {
  process.stdout.write(JSON.stringify(object) + '\n');
}

function deadlineIn(ms) {
  return new Date(Date.now() + ms);
}

function errorFields(error) {
  return { code: error.code, details: error.details };
}

function usage(message) {
  process.stderr.write(
    `health_client.js: ${message}\n` +
      'usage: health_client.js check <addr> <service> | watch <addr> <service> <n> |' +
      ' list <addr> | kubelet <addr> <service> <count>\n',
  );
  process.exit(2);
}

function positiveInt(text, what) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) usage(`${what} must be a positive integer, not ${text}`);
  return value;
}

function newClient(addr, options = {}) {
  return new HealthClient(addr, grpc.credentials.createInsecure(), options);
}

function check(addr, service) {
  const client = newClient(addr);
  client.Check({ service }, { deadline: deadlineIn(RPC_TIMEOUT_MS) }, (error, response) => {
    if (error) emit({ ...errorFields(error), status: null });
    else emit({ code: grpc.status.OK, status: response.status, details: '' });
    client.close();
  });
}

function watch(addr, service, n) {
  const client = newClient(addr);
  const call = client.Watch({ service });
  let received = 0;
  let cancelledByUs = false;
  const finish = (end, exitCode) => {
    clearTimeout(timer);
    emit({ end });
    client.close();
    process.exitCode = exitCode;
  };
  const timer = setTimeout(() => {
    cancelledByUs = true;
    call.cancel();
  }, WATCH_TIMEOUT_MS);
  call.on('data', (response) => {
    if (received >= n) return;
    received += 1;
    emit({ status: response.status });
    if (received === n) {
      cancelledByUs = true;
      call.cancel();
    }
  });
  // grpc-js reports every end of the call through 'status'; a non-OK end (our own
  // cancel included) also comes as 'error', which must be listened to or it throws.
  call.on('error', () => {});
  call.on('status', (status) => {
    const end = { code: status.code, details: status.details, received };
    if (cancelledByUs) end.cancelled_by = received === n ? 'client' : 'timeout';
    finish(end, received === n ? 0 : 1);
  });
}

function list(addr) {
  const client = newClient(addr);
  client.List({}, { deadline: deadlineIn(RPC_TIMEOUT_MS) }, (error, response) => {
    if (error) {
      emit(errorFields(error));
    } else {
      const statuses = {};
      for (const [name, entry] of Object.entries(response.statuses)) statuses[name] = entry.status;
      emit({ code: grpc.status.OK, statuses });
    }
    client.close();
  });
}

// One probe as the kubelet makes it: a new channel (and connection), one deadline for
// dial and Check together, success only on OK + SERVING, then the channel is closed.
function kubeletProbe(addr, service) {
  return new Promise((resolve) => {
    const client = newClient(addr, {
      'grpc.primary_user_agent': KUBELET_USER_AGENT,
      'grpc.use_local_subchannel_pool': 1,
    });
    const deadline = deadlineIn(KUBELET_TIMEOUT_MS);
    const done = (outcome) => {
      client.close();
      resolve(outcome);
    };
    client.waitForReady(deadline, (dialError) => {
      if (dialError) {
        done({ ok: false, reason: `dial: ${dialError.message}` });
        return;
      }
      client.Check({ service }, { deadline }, (error, response) => {
        if (error) done({ ok: false, reason: `code ${error.code}: ${error.details}` });
        else if (response.status !== 'SERVING') done({ ok: false, reason: response.status });
        else done({ ok: true });
      });
    });
  });
}

async function kubelet(addr, service, count) {
  const summary = { ok: 0, failed: 0, connections: 0, user_agent: KUBELET_USER_AGENT, reasons: {} };
  const before = tcpConnects;
  for (let i = 0; i < count; i += 1) {
    const outcome = await kubeletProbe(addr, service);
    if (outcome.ok) {
      summary.ok += 1;
    } else {
      summary.failed += 1;
      summary.reasons[outcome.reason] = (summary.reasons[outcome.reason] || 0) + 1;
    }
  }
  summary.connections = tcpConnects - before;
  emit(summary);
}

function main(argv) {
  const [command, addr, ...rest] = argv;
  if (!command || !addr) usage('a command and an address are required');
  switch (command) {
    case 'check':
      if (rest.length !== 1) usage('check takes <addr> <service>');
      check(addr, rest[0]);
      break;
    case 'watch':
      if (rest.length !== 2) usage('watch takes <addr> <service> <n>');
      watch(addr, rest[0], positiveInt(rest[1], 'n'));
      break;
    case 'list':
      if (rest.length !== 0) usage('list takes <addr>');
      list(addr);
      break;
    case 'kubelet':
      if (rest.length !== 2) usage('kubelet takes <addr> <service> <count>');
      kubelet(addr, rest[0], positiveInt(rest[1], 'count')).catch((error) => {
        process.stderr.write(`${error.stack}\n`);
        process.exitCode = 1;
      });
      break;
    default:
      usage(`unknown command ${command}`);
  }
}

main(process.argv.slice(2));
