#!/usr/bin/env bash
# Runs all four services locally on their embedded defaults (SQLite files under .data/, the
# embedded queue): nothing to install but Rust. Ctrl-C stops them all.
#
#   product-catalog  gRPC 127.0.0.1:50051  admin http://127.0.0.1:9091/metrics
#   sync-relay       gRPC 127.0.0.1:50052  admin http://127.0.0.1:9092/metrics
#   member-export    gRPC 127.0.0.1:50053  admin http://127.0.0.1:9093/metrics
#   log-ingest       gRPC 127.0.0.1:50054  admin http://127.0.0.1:9094/metrics  forward 127.0.0.1:24224
#                    (no Loki locally: accepted logs wait in .data/log-ingest/buffer, retried)
#   partner-simulator      http://127.0.0.1:8089 (member-export's marketing platform, locally)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

services=(product-catalog sync-relay member-export log-ingest)
have cargo || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
say "building ${services[*]}"
cargo build --quiet $(printf -- '-p %s ' "${services[@]}")

pids=()
stop() {
  say "stopping"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

# member-export delivers to this stand-in for the marketing platform (its default partner).
"$ROOT/target/debug/partner-simulator" > >(sed -u "s/^/[partner-simulator] /") 2>&1 &
pids+=("$!")
for service in "${services[@]}"; do
  # Each line is prefixed with its service, so four logs stay readable in one terminal.
  "$ROOT/target/debug/$service" > >(sed -u "s/^/[$service] /") 2>&1 &
  pids+=("$!")
done
say "running; Ctrl-C to stop (data in .data/)"
wait
