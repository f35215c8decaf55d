#!/usr/bin/env bash
# Installs the pinned tools the quality gates need, into .tools/ where possible:
#   buf (from the npm package @bufbuild/buf) and cargo-nextest (from crates.io, if missing).
# Safe to run repeatedly: it only installs what is missing or at the wrong version.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

have cargo || die "cargo is missing: install Rust with rustup (https://rustup.rs), then run this again"

if ! have cargo-nextest; then
  say "installing cargo-nextest (once; a few minutes)"
  cargo install cargo-nextest --locked --quiet || die "could not install cargo-nextest from crates.io"
fi

BUF="$TOOLS/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if ! have npm; then
    say "npm is missing; installing Node.js and npm from Debian packages"
    apt_install nodejs npm || die "buf comes from npm, and npm is missing: install Node.js 18+ with npm"
  fi
  say "installing buf $BUF_VERSION from npm into .tools/"
  npm install --prefix "$TOOLS" --no-save --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" \
    || die "npm could not install @bufbuild/buf@$BUF_VERSION"
fi
