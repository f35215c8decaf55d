#!/usr/bin/env bash
# Runs a benchmark and writes its section of BENCHMARKS.md (machine, date, command, results).
#
#   scripts/bench.sh catalog    product-catalog on PostgreSQL: BulkUpdateProducts vs a
#                               hand-written upsert; GetProduct vs health Check
#
# Release build (a few minutes the first time). Run it on a quiet machine: every figure is
# reported next to a baseline measured in the same run, but a busy machine still adds noise.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

target="${1:-}"
case "$target" in
  catalog)
    MALL_TEST_POSTGRES_URL="$("$ROOT/scripts/postgres.sh")"
    export MALL_TEST_POSTGRES_URL
    say "benchmark: product-catalog (release build)"
    cargo bench -p product-catalog --bench catalog
    ;;
  *)
    die "usage: scripts/bench.sh catalog"
    ;;
esac
