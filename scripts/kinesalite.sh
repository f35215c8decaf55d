#!/usr/bin/env bash
# Makes sure kinesalite (a faithful local Kinesis, in memory) answers at
# $MALL_TEST_KINESIS_ENDPOINT (default http://127.0.0.1:4567) for the tests.
#   scripts/kinesalite.sh        reuse one that answers; else install it (once, from npm, into
#                                .tools/kinesalite/) and start it; prints the endpoint on stdout
#   scripts/kinesalite.sh stop   stop the one this script started (its pid is in .run/)
# Its log is .run/kinesalite.log. Data lives in memory: a restart starts with no streams, which
# is what tests want (each makes its own stream anyway).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

KINESALITE_VERSION="3.3.3"

endpoint="${MALL_TEST_KINESIS_ENDPOINT:-http://127.0.0.1:4567}"
hostport="${endpoint#*://}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=4567
dir="$TOOLS/kinesalite"
pidfile="$RUN/kinesalite.pid"
log="$RUN/kinesalite.log"

running_pid() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && cat "$pidfile"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$pidfile"
    say "no kinesalite started by this script is running"
    return 0
  fi
  say "stopping kinesalite (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# True when a Kinesis API answers at the endpoint: an unsigned ListStreams gets a JSON error
# naming its type, which a random program on the port would not send.
answers() {
  have node || return 1
  node -e '
    const [host, port] = [process.argv[1], Number(process.argv[2])];
    const req = require("http").request({ host, port, method: "POST", path: "/", timeout: 2000,
      headers: { "Content-Type": "application/x-amz-json-1.1",
                 "X-Amz-Target": "Kinesis_20131202.ListStreams" } }, (res) => {
      let body = ""; res.on("data", (c) => body += c);
      res.on("end", () => process.exit(/__type|StreamNames/.test(body) ? 0 : 1));
    });
    req.on("error", () => process.exit(1));
    req.on("timeout", () => { req.destroy(); process.exit(1); });
    req.end("{}");' "$host" "$port" 2>/dev/null
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi
[ $# -eq 0 ] || die "usage: scripts/kinesalite.sh [stop]"

if answers; then
  say "kinesalite already answers at $endpoint; reusing it"
  echo "$endpoint"
  exit 0
fi
port_open "$host" "$port" && die "something that is not Kinesis listens on $host:$port; stop it or set MALL_TEST_KINESIS_ENDPOINT"

if ! have node || ! have npm; then
  say "Node.js or npm is missing; installing them from Debian packages"
  apt_install nodejs npm || die "kinesalite runs on Node.js and comes from npm, and this machine has neither: install Node.js 18+ with npm"
fi

if [ ! -f "$dir/node_modules/kinesalite/package.json" ] \
   || ! grep -q "\"version\": \"$KINESALITE_VERSION\"" "$dir/node_modules/kinesalite/package.json"; then
  say "installing kinesalite $KINESALITE_VERSION from npm into .tools/kinesalite/"
  # Its own prefix, so other tools' npm installs in .tools/ cannot prune it (nor it them).
  # The optional LevelDB binding is for on-disk data, which the tests do not need.
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-save --no-audit --no-fund --silent --omit=optional \
    "kinesalite@$KINESALITE_VERSION" || die "npm could not install kinesalite@$KINESALITE_VERSION"
fi

# kinesalite's CLI binds every address; these lines listen on $host only. The short state
# changes (CREATING, UPDATING after a split or merge) keep tests fast; the shard limit is
# raised because every test makes its own stream in this one server.
cat > "$dir/serve.js" <<'EOF'
const kinesalite = require(process.argv[2]);
const [port, host] = [Number(process.argv[3]), process.argv[4]];
const server = kinesalite({ createStreamMs: 50, deleteStreamMs: 50, updateStreamMs: 50, shardLimit: 100000 });
server.on("error", (error) => { console.error(`kinesalite failed: ${error.message}`); process.exit(1); });
server.listen(port, host, () => console.log(`kinesalite ${process.argv[5]} listening on http://${host}:${port}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
EOF

stop >/dev/null 2>&1 || true
say "starting kinesalite on $host:$port (log in .run/kinesalite.log)"
setsid nohup node "$dir/serve.js" "$dir/node_modules/kinesalite" "$port" "$host" "$KINESALITE_VERSION" \
  >"$log" 2>&1 < /dev/null &
echo $! > "$pidfile"
for _ in $(seq 1 100); do
  answers && break
  kill -0 "$(cat "$pidfile")" 2>/dev/null || die "kinesalite exited at start; see .run/kinesalite.log:
$(tail -5 "$log")"
  sleep 0.1
done
answers || die "kinesalite did not answer at $endpoint within 10s; see .run/kinesalite.log"
echo "$endpoint"
