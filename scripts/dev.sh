#!/usr/bin/env bash
# Runs all four services locally on their embedded defaults (SQLite files under .data/, the
# embedded queue): nothing to install but Rust. Ctrl-C stops them all.
#
#   product-catalog  gRPC 127.0.0.1:50051  admin http://127.0.0.1:9091/metrics
#   sync-relay       gRPC 127.0.0.1:50052  admin http://127.0.0.1:9092/metrics
#   member-export    gRPC 127.0.0.1:50053  admin http://127.0.0.1:9093/metrics
#   log-ingest       gRPC 127.0.0.1:50054  admin http://127.0.0.1:9094/metrics  forward 127.0.0.1:24224
#   partner-simulator      http://127.0.0.1:8089 (member-export's marketing platform, locally)
#   loki-receiver          http://127.0.0.1:3100 (log-ingest's Loki, locally: checks pushes as
#                          Loki does, entries of any time taken, and counts them; the records
#                          are seen with TailLogs)
#
# `scripts/dev.sh --tls` runs the same with mutual TLS on every gRPC and forward listener and
# on the relay's calls to the catalog, with certificates from `scripts/certs.sh` (made in
# .data/certs when missing); the README shows calls with grpcurl and relayctl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

services=(product-catalog sync-relay member-export log-ingest)
tls=false
case "${1:-}" in
  --tls) tls=true ;;
  "") ;;
  *) die "usage: scripts/dev.sh [--tls]" ;;
esac
have cargo || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
certs="$ROOT/.data/certs"
if $tls; then
  [ -f "$certs/mall-ca.crt" ] || "$ROOT/scripts/certs.sh" "$certs"
  # Each service serves its own certificate and trusts the local CA for its callers.
  for service in "${services[@]}"; do
    prefix="$(echo "$service" | tr 'a-z-' 'A-Z_')"
    export "${prefix}__SERVER__TLS__CERT_FILE=$certs/$service.crt"
    export "${prefix}__SERVER__TLS__KEY_FILE=$certs/$service.key"
    export "${prefix}__SERVER__TLS__CLIENT_CA_FILE=$certs/mall-ca.crt"
  done
  # The relay calls the catalog as itself; log-ingest's forward listener is TLS too.
  export SYNC_RELAY__APPLY__CATALOG_URL="https://localhost:50051"
  export SYNC_RELAY__APPLY__CATALOG_TLS__CA_FILE="$certs/mall-ca.crt"
  export SYNC_RELAY__APPLY__CATALOG_TLS__CERT_FILE="$certs/sync-relay.crt"
  export SYNC_RELAY__APPLY__CATALOG_TLS__KEY_FILE="$certs/sync-relay.key"
  export LOG_INGEST__FORWARD__TLS__CERT_FILE="$certs/log-ingest.crt"
  export LOG_INGEST__FORWARD__TLS__KEY_FILE="$certs/log-ingest.key"
  export LOG_INGEST__FORWARD__TLS__CLIENT_CA_FILE="$certs/mall-ca.crt"
  say "mutual TLS on; certificates in $certs (admin: admin.crt, a reader: reader.crt)"
fi
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
# log-ingest pushes to this stand-in for Loki (its default loki.url). Entries of any time are
# taken, so samples of the legacy format (dated 2024) go through; Loki's defaults refuse them.
"$ROOT/target/debug/loki-receiver" --accept-any-time > >(sed -u "s/^/[loki-receiver] /") 2>&1 &
pids+=("$!")
for service in "${services[@]}"; do
  # Each line is prefixed with its process, so the logs stay readable in one terminal.
  "$ROOT/target/debug/$service" > >(sed -u "s/^/[$service] /") 2>&1 &
  pids+=("$!")
done
say "running; Ctrl-C to stop (data in .data/)"
wait
