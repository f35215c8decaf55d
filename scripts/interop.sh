#!/usr/bin/env bash
# Proves that a client in another language can use the services through server reflection:
# starts the four debug binaries on free ports (SQLite in a temporary directory) and runs
# tests/interop/reflection_client.py (Python grpcio + grpcio-reflection) against each.
# Called by scripts/test.sh after the Rust tests, which have built the binaries.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

have python3 || die "python3 is missing: the interop check runs a Python gRPC client (apt-get install python3 python3-venv)"
VENV="$TOOLS/pyclient"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import grpc_reflection, grpc_health' 2>/dev/null; then
  say "installing the Python gRPC client (grpcio, grpcio-reflection) into .tools/pyclient"
  python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio==1.85.*' 'grpcio-reflection==1.85.*' 'grpcio-health-checking==1.85.*' \
    || die "pip could not install grpcio from PyPI"
fi

work="$(mktemp -d)"
pids=()
cleanup() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

targets=()
for service in product-catalog sync-relay member-export log-ingest; do
  prefix="$(echo "$service" | tr 'a-z-' 'A-Z_')"
  settings=("${prefix}__SERVER__LISTEN_ADDR=127.0.0.1:0" "${prefix}__SERVER__ADMIN_ADDR=127.0.0.1:0"
            "${prefix}__TELEMETRY__LOG_FORMAT=json")
  # log-ingest keeps no state, so it has no database section.
  [ "$service" = log-ingest ] || settings+=("${prefix}__DATABASE__URL=sqlite://$work/$service.sqlite")
  env "${settings[@]}" "$ROOT/target/debug/$service" >"$work/$service.log" 2>&1 &
  pids+=("$!")
  addr=""
  for _ in $(seq 1 150); do
    addr="$(grep -o '"grpc_addr":"[^"]*"' "$work/$service.log" | head -1 | cut -d'"' -f4 || true)"
    [ -n "$addr" ] && break
    sleep 0.2
  done
  [ -n "$addr" ] || { cat "$work/$service.log" >&2; die "$service did not start"; }
  targets+=("$addr")
done
"$VENV/bin/python" tests/interop/reflection_client.py "${targets[@]}"
