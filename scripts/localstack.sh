#!/usr/bin/env bash
# LocalStack (SQS only) for the queue tests, without Docker:
#   scripts/localstack.sh start   reuse one that answers, or install and start one; prints the endpoint
#   scripts/localstack.sh stop    stop the one this script started (SIGTERM, then SIGKILL after a grace period)
#
# It installs localstack-core from PyPI into .tools/localstack-venv with Python 3.13 (python3.13
# on PATH, else pyenv's 3.13), with the pins ../shared/DESIGN.md lists, and runs it on
# 127.0.0.1:4566 with its state, temporary files and log under .run/localstack/. When Python 3.13
# is missing it says so and fails: the SQS tests are never skipped.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

LOCALSTACK_VERSION="4.14.0"
# Known-good pins on this platform: newer cbor2, pyopenssl and cryptography break its start-up.
LOCALSTACK_PINS=("cbor2<6" "pyopenssl<24.3" "cryptography<44" "service_identity")
HOST=127.0.0.1
PORT=4566
ENDPOINT="http://$HOST:$PORT"
VENV="$TOOLS/localstack-venv"
STATE="$RUN/localstack"
PIDFILE="$STATE/localstack.pid"
LOG="$STATE/localstack.log"

# True when SQS answers a ListQueues call (awsJson1_0, as the Rust SDK speaks it).
sqs_answers() {
  have curl || { port_open "$HOST" "$PORT"; return; }
  curl -fsS -m 3 -o /dev/null -X POST "$ENDPOINT/" \
    -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'X-Amz-Target: AmazonSQS.ListQueues' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0' \
    -d '{}' 2>/dev/null
}

find_python() {
  if have python3.13; then
    # pyenv's shim is on PATH even when 3.13 is not the selected version: ask it to run.
    if python3.13 -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
      echo python3.13; return
    fi
  fi
  if have pyenv; then
    local version
    version="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.13(\.[0-9]+)?$' | sort -V | tail -n1 || true)"
    if [ -n "$version" ]; then
      echo "$(pyenv root)/versions/$version/bin/python3.13"; return
    fi
  fi
  # pyenv installed but not on PATH (a non-login shell, CI).
  local candidate
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  return 1
}

install() {
  local marker="$VENV/.installed-$LOCALSTACK_VERSION"
  [ -f "$marker" ] && return
  local python
  python="$(find_python)" || die "LocalStack needs Python 3.13, and neither python3.13 on PATH nor a pyenv 3.13 was found.
Install it (for example 'pyenv install 3.13.0', or your distribution's python3.13 with its venv module) and run this again."
  say "installing localstack-core $LOCALSTACK_VERSION into .tools/localstack-venv with $("$python" --version)"
  rm -rf "$VENV"
  "$python" -m venv "$VENV" || die "could not create a virtual environment with $python (is its venv module installed?)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "localstack-core[runtime]==$LOCALSTACK_VERSION" "${LOCALSTACK_PINS[@]}" \
    || die "pip could not install localstack-core $LOCALSTACK_VERSION from PyPI"
  touch "$marker"
}

start() {
  if sqs_answers; then
    say "LocalStack SQS already answers at $ENDPOINT; reusing it"
    echo "$ENDPOINT"; return
  fi
  port_open "$HOST" "$PORT" && die "something listens on $HOST:$PORT but does not answer SQS calls; stop it first"
  install
  mkdir -p "$STATE/filesystem" "$STATE/tmp"
  say "starting LocalStack (SQS) on $ENDPOINT, log in ${LOG#"$ROOT/"}"
  # setsid: its own process group, so stop can signal the runtime and every child it forks.
  env OVERRIDE_IN_DOCKER=0 GATEWAY_SERVER=hypercorn DNS_ADDRESS=0 \
      GATEWAY_LISTEN="$HOST:$PORT" LOCALSTACK_HOST="$HOST:$PORT" \
      SQS_ENDPOINT_STRATEGY=path SERVICES=sqs \
      FILESYSTEM_ROOT="$STATE/filesystem" TMPDIR="$STATE/tmp" \
      setsid "$VENV/bin/python" -m localstack.runtime.main >"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PIDFILE"
  for _ in $(seq 1 240); do
    sqs_answers && { say "LocalStack SQS answers"; echo "$ENDPOINT"; return; }
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "LocalStack exited during start-up; log above"; }
    sleep 0.5
  done
  tail -n 30 "$LOG" >&2
  die "LocalStack did not answer SQS calls at $ENDPOINT within 120s; log above"
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid="$(cat "$PIDFILE")"
  rm -f "$PIDFILE"
  kill -0 "$pid" 2>/dev/null || return 0
  say "stopping LocalStack (pid $pid)"
  # Its SIGTERM handling can hang: give it a grace period, then kill the whole group.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  warn "LocalStack ignored SIGTERM for 10s; sending SIGKILL"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: scripts/localstack.sh [start|stop]" ;;
esac
