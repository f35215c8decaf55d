// A forward-protocol client written by others: the npm package fluent-logger (3.x), with
// acknowledgements required. Sends COUNT records {log: "line <i>", host: "node-peer"} under
// TAG in MODE (Message, PackedForward or CompressedPackedForward), with a shared key when
// SHARED_KEY is set; exits 0 once every record was acknowledged, 1 on any error.
//
//   node fluent_logger_client.js PORT MODE COUNT TAG [SHARED_KEY]
'use strict';
const logger = require('fluent-logger');

const [port, mode, count, tag, sharedKey] = process.argv.slice(2);
const options = {
  host: '127.0.0.1',
  port: Number(port),
  timeout: 10.0,
  reconnectInterval: 600000, // no silent reconnects: a closed connection is an error here
  requireAckResponse: true,
  ackResponseTimeout: 10000,
  eventMode: mode,
  flushInterval: 20,
};
if (sharedKey) {
  options.security = { clientHostname: 'node-peer', sharedKey };
}
const sender = logger.createFluentSender(null, options);
let failed = false;
sender.on('error', (error) => {
  // Any error (a refused handshake, a missing ack) fails the run at once.
  console.error('fluent-logger error:', error && error.message);
  process.exit(1);
});
const sends = [];
for (let i = 0; i < Number(count); i++) {
  sends.push(new Promise((resolve) => {
    sender.emit(tag, { log: `line ${i}`, host: 'node-peer' }, new logger.EventTime(1730103120, i), (error) => {
      if (error) {
        failed = true;
        console.error('not acknowledged:', error.message);
      }
      resolve();
    });
  }));
}
Promise.all(sends).then(() => {
  sender.end();
  process.exit(failed ? 1 : 0);
});
setTimeout(() => {
  console.error('timed out waiting for acknowledgements');
  process.exit(1);
}, 30000);
