#!/usr/bin/env bash
# The one command that runs every quality gate and every test, as CI does:
#   cargo fmt --check · buf lint and buf breaking (scripts/contracts.sh) · the Kubernetes manifests
#   (scripts/manifests.sh) · dashboards, rules, alert tests and compose (scripts/observability.sh)
#   · cargo nextest (with tests/e2e: the four services as processes, traces and Prometheus) · the
#   image recipe's build context loads the workspace (scripts/image-context.sh) · a Python gRPC
#   client against every service (interop) · cargo clippy -D warnings
# It installs what the tests need when it is missing (buf, cargo-nextest, PostgreSQL, the
# manifest validators, Prometheus, docker-compose, grafanalib) and fails
# with a clear message for anything it cannot provide. Tests are never skipped.
#
# Usage: scripts/test.sh [extra nextest arguments, such as a test name filter]
# (tests marked #[ignore] run too; NEXTEST_RUN_IGNORED=only runs those alone)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
started=$SECONDS

"$ROOT/scripts/tools.sh"
BUF="$TOOLS/node_modules/.bin/buf"

say "cargo fmt --check"
cargo fmt --all -- --check || die "formatting differs: run 'cargo fmt --all'"

say "contracts: buf lint, buf breaking against the committed baseline"
"$ROOT/scripts/contracts.sh" check
against="${MALL_BUF_BREAKING_AGAINST:-}"
if [ -n "$against" ]; then
  say "buf breaking --against $against"
  "$BUF" breaking --against "$against" || die "proto changes break compatibility with $against"
fi

say "manifests: kubectl kustomize deploy/k8s (base, production overlay, logging), every object validated"
"$ROOT/scripts/manifests.sh"

say "observability: generated dashboards and SLO rules, promtool, alert tests and runbooks, compose"
"$ROOT/scripts/observability.sh"

say "PostgreSQL for the tests"
MALL_TEST_POSTGRES_URL="$("$ROOT/scripts/postgres.sh")"
export MALL_TEST_POSTGRES_URL

say "kinesalite (a local Kinesis) for the tests"
kinesalite_pid="$(cat "$RUN/kinesalite.pid" 2>/dev/null || true)"
MALL_TEST_KINESIS_ENDPOINT="$("$ROOT/scripts/kinesalite.sh")"
export MALL_TEST_KINESIS_ENDPOINT
# Stop it at exit only if this run started it (a new pid); one that was already running stays.
if [ "$(cat "$RUN/kinesalite.pid" 2>/dev/null || true)" != "$kinesalite_pid" ]; then
  trap '"$ROOT/scripts/kinesalite.sh" stop >/dev/null 2>&1 || true' EXIT
fi

say "LocalStack (SQS) for the queue tests"
localstack_pid="$(cat "$RUN/localstack/localstack.pid" 2>/dev/null || true)"
MALL_TEST_SQS_ENDPOINT="$("$ROOT/scripts/localstack.sh" start)"
export MALL_TEST_SQS_ENDPOINT
# Stop it at exit only if this run started it, in addition to what the EXIT trap already does.
if [ "$(cat "$RUN/localstack/localstack.pid" 2>/dev/null || true)" != "$localstack_pid" ]; then
  eval "exit_trap=$(trap -p EXIT | sed -E 's/^trap -- (.*) EXIT$/\1/')"
  trap "${exit_trap:+$exit_trap; }\"\$ROOT/scripts/localstack.sh\" stop >/dev/null 2>&1 || true" EXIT
fi

say "Node.js clients for log-ingest's tests (fluent-logger)"
MALL_TEST_NODE_MODULES="$("$ROOT/scripts/node-peers.sh")"
export MALL_TEST_NODE_MODULES

# The tests build first: clippy then reuses the dependency metadata and adds about a minute.
say "cargo nextest run"
# `--run-ignored all`: a test marked #[ignore] runs too, rather than pass as skipped
# (NEXTEST_RUN_IGNORED=only runs those alone).
cargo nextest run --workspace --profile "${NEXTEST_PROFILE:-default}" \
  --run-ignored "${NEXTEST_RUN_IGNORED:-all}" "$@"

say "image: deploy/Dockerfile's build context resolves as the workspace (cargo tree --locked, offline)"
"$ROOT/scripts/image-context.sh"

say "interop: a Python gRPC client lists and health-checks every service through reflection"
"$ROOT/scripts/interop.sh"

say "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "all gates passed in $((SECONDS - started))s"
