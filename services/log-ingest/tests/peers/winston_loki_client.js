// A Loki client written by others: the npm package winston-loki (protobuf + snappy, as
// Loki's own clients send), pushing COUNT lines with labels to HOST (a Loki-compatible
// receiver). Exits 0 once its batches were sent without a connection error.
//
//   node winston_loki_client.js HOST COUNT
'use strict';
const winston = require('winston');
const LokiTransport = require('winston-loki');

const [host, count] = process.argv.slice(2);
let failed = false;
const transport = new LokiTransport({
  host,
  json: false, // protobuf + snappy
  batching: true,
  interval: 0.2,
  labels: { service: 'winston-peer' },
  format: winston.format.printf((info) => `${info.level} ${info.message}`),
  onConnectionError: (error) => {
    failed = true;
    console.error('winston-loki connection error:', error && error.message);
  },
});
const logger = winston.createLogger({ transports: [transport] });
for (let i = 0; i < Number(count); i++) {
  logger.info(`line ${i}`, { labels: { host: 'node-peer' } });
}
setTimeout(async () => {
  await transport.flush();
  transport.close && transport.close();
  setTimeout(() => process.exit(failed ? 1 : 0), 300);
}, 1500);
setTimeout(() => {
  console.error('timed out');
  process.exit(1);
}, 15000);
