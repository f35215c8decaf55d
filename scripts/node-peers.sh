#!/usr/bin/env bash
# Installs the Node.js clients written by others that log-ingest's tests talk to (the npm
# package fluent-logger, a Fluent forward protocol client), once, into .tools/node-peers/,
# and prints its node_modules directory on stdout (the tests read it from
# MALL_TEST_NODE_MODULES).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FLUENT_LOGGER_VERSION="3.4.1"
dir="$TOOLS/node-peers"

have node || apt_install nodejs npm || die "log-ingest's tests need Node.js 18+ with npm (the fluent-logger client): install them"
installed="$(node -p "require('$dir/node_modules/fluent-logger/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$FLUENT_LOGGER_VERSION" ]; then
  say "installing fluent-logger $FLUENT_LOGGER_VERSION from npm into .tools/node-peers/"
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-save --no-audit --no-fund --silent "fluent-logger@$FLUENT_LOGGER_VERSION" \
    || die "npm could not install fluent-logger@$FLUENT_LOGGER_VERSION"
fi
echo "$dir/node_modules"
