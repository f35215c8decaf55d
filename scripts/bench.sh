#!/usr/bin/env bash
# Runs a benchmark and writes its section of BENCHMARKS.md (machine, date, command, results).
#
#   scripts/bench.sh catalog    product-catalog on PostgreSQL: BulkUpdateProducts vs a
#                               hand-written upsert; GetProduct vs health Check
#   scripts/bench.sh tls        product-catalog's GetProduct with mutual TLS next to plaintext in
#                               the same run, and a normal caller's latency while hostile
#                               clients attack (never-finished handshakes, trickled HTTP/2, one
#                               caller flooding). SQLite; nothing to start.
#   scripts/bench.sh relay      sync-relay end to end: 10,000 and 100,000 changes from publish to
#                               visible in the catalog, (a) embedded queue + SQLite and (b) Kinesis
#                               (kinesalite) + SQS (LocalStack) + PostgreSQL and (c) embedded queue
#                               + PostgreSQL, next to the catalog's raw BulkUpdateProducts rate;
#                               then paced runs at 5,000 changes/s (and 10,000 on (a) and (c)).
#                               Starts PostgreSQL, LocalStack and kinesalite when they are not
#                               running, and stops at exit what it started. Extra arguments go to
#                               the benchmark (e.g. 'embedded', 'quick'; see benches/relay.rs).
#   scripts/bench.sh member     member-export: a partner limited to 400 requests/s (one replica;
#                               two replicas sharing it on PostgreSQL), an unlimited partner at 20
#                               ms (groobee batches, webhook one per request, EnqueueMemberChanges),
#                               and a failover job over 1,000,000 members with its peak RSS.
#                               Extra arguments go to the benchmark (e.g. 'limited', 'quick').
#   scripts/bench.sh logs       log-ingest end to end: the 2,000,000-line legacy corpus over the
#                               forward protocol (acks on) → buffer → parse, group, mask → a
#                               Loki-compatible receiver, next to a receive-and-decode-only
#                               baseline; peak RSS of the log-ingest process. Needs python3 and
#                               ../shared/bench/gen_hybris_log.py (or MALL_HYBRIS_LOG_GENERATOR).
#                               Extra arguments go to the benchmark ('quick', 'lines=N'). Then
#                               the chaos test (tests/chaos.rs) with 1,000,000 lines.
#   scripts/bench.sh logs workloads
#                               the same corpus in other shapes (1 and 16 connections, 100 and
#                               10,000 entries per message, packed and gzip modes, OTLP exports),
#                               each next to its own decode-only baseline; no chaos run.
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
    shift
    cargo bench -p product-catalog --bench catalog -- "$@"
    ;;
  tls)
    say "benchmark: mutual TLS and hostile clients (release build)"
    shift
    cargo bench -p product-catalog --bench tls -- "$@"
    ;;
  relay)
    shift
    MALL_TEST_POSTGRES_URL="$("$ROOT/scripts/postgres.sh")"
    export MALL_TEST_POSTGRES_URL
    # As scripts/test.sh does: stop at exit only what this run started (a new pid).
    kinesalite_pid="$(cat "$RUN/kinesalite.pid" 2>/dev/null || true)"
    MALL_TEST_KINESIS_ENDPOINT="$("$ROOT/scripts/kinesalite.sh")"
    export MALL_TEST_KINESIS_ENDPOINT
    stop_started=""
    if [ "$(cat "$RUN/kinesalite.pid" 2>/dev/null || true)" != "$kinesalite_pid" ]; then
      stop_started='"$ROOT/scripts/kinesalite.sh" stop >/dev/null 2>&1 || true'
    fi
    localstack_pid="$(cat "$RUN/localstack/localstack.pid" 2>/dev/null || true)"
    MALL_TEST_SQS_ENDPOINT="$("$ROOT/scripts/localstack.sh" start)"
    export MALL_TEST_SQS_ENDPOINT
    if [ "$(cat "$RUN/localstack/localstack.pid" 2>/dev/null || true)" != "$localstack_pid" ]; then
      stop_started="${stop_started:+$stop_started; }\"\$ROOT/scripts/localstack.sh\" stop >/dev/null 2>&1 || true"
    fi
    [ -z "$stop_started" ] || trap "$stop_started" EXIT
    say "benchmark: sync-relay end to end (release build)"
    cargo bench -p sync-relay --bench relay -- "$@"
    ;;
  member)
    shift
    MALL_TEST_POSTGRES_URL="$("$ROOT/scripts/postgres.sh")"
    export MALL_TEST_POSTGRES_URL
    say "benchmark: member-export (release build)"
    cargo bench -p member-export --bench member -- "$@"
    ;;
  logs)
    shift
    say "benchmark: log-ingest (release build)"
    cargo bench -p log-ingest --bench logs -- "$@"
    case " $* " in *" workloads "*) exit 0 ;; esac
    say "chaos at 1,000,000 lines: three SIGKILLs and a 20 s Loki outage (release build)"
    chaos_log="$ROOT/target/chaos-1000000.log"
    MALL_CHAOS_LINES=1000000 cargo test --release -p log-ingest --test chaos -- --nocapture \
      >"$chaos_log" 2>&1 || { tail -n 40 "$chaos_log"; die "the chaos run failed; all of its output: $chaos_log"; }
    grep -E "lines, .* records|test result" "$chaos_log"
    echo "(all of its output: $chaos_log)"
    ;;
  *)
    die "usage: scripts/bench.sh catalog|tls|relay|member|logs [workloads]"
    ;;
esac
