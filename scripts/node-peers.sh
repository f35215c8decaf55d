#!/usr/bin/env bash
# Installs the Node.js clients written by others that log-ingest's tests talk to (the npm
# packages fluent-logger, a Fluent forward protocol client, and winston-loki, a Loki push
# client sending protobuf + snappy), once, into .tools/node-peers/,
# and prints its node_modules directory on stdout (the tests read it from
# MALL_TEST_NODE_MODULES).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FLUENT_LOGGER_VERSION="3.4.1"
WINSTON_LOKI_VERSION="6.1.7"
WINSTON_VERSION="3.17.0"
dir="$TOOLS/node-peers"

have node || apt_install nodejs npm || die "log-ingest's tests need Node.js 18+ with npm (the fluent-logger client): install them"
version() { node -p "require('$dir/node_modules/$1/package.json').version" 2>/dev/null || true; }
if [ "$(version fluent-logger)" != "$FLUENT_LOGGER_VERSION" ] \
  || [ "$(version winston-loki)" != "$WINSTON_LOKI_VERSION" ] \
  || [ "$(version winston)" != "$WINSTON_VERSION" ] \
  || [ ! -d "$dir/node_modules/snappy" ]; then
  say "installing fluent-logger $FLUENT_LOGGER_VERSION, winston-loki $WINSTON_LOKI_VERSION (with snappy) from npm into .tools/node-peers/"
  mkdir -p "$dir"
  # winston-loki sends protobuf only when its optional snappy module loads (prebuilt).
  npm install --prefix "$dir" --no-save --no-audit --no-fund --silent \
    "fluent-logger@$FLUENT_LOGGER_VERSION" "winston-loki@$WINSTON_LOKI_VERSION" \
    "winston@$WINSTON_VERSION" "snappy@7" \
    || die "npm could not install the Node.js test peers"
fi
echo "$dir/node_modules"
