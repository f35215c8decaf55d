#!/usr/bin/env bash
# The gRPC contracts' compatibility gate, against a committed baseline image of proto/.
#
#   scripts/contracts.sh check    buf lint; buf breaking against proto/baseline.binpb; and the
#                                 baseline must be the contracts as they are now
#   scripts/contracts.sh update   rebuild proto/baseline.binpb from proto/ (after a deliberate,
#                                 reviewed contract change whose `check` breaking step passed)
#
# Comparing with a committed image rather than with origin/main works in a clean clone of main
# (CI's), where there is no other branch to compare with. Because `check` also requires the
# baseline to be current, every contract change updates it in the same commit, and the next
# change is compared with this one.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

"$ROOT/scripts/tools.sh"
BUF="$TOOLS/node_modules/.bin/buf"
BASELINE=proto/baseline.binpb

build() {
  # Without source info: comments are not part of compatibility, and the image stays small.
  "$BUF" build --exclude-source-info -o "$1"
}

case "${1:-check}" in
  check)
    "$BUF" lint || die "buf lint found problems in proto/"
    [ -f "$BASELINE" ] || die "$BASELINE is missing: create it with 'scripts/contracts.sh update'"
    "$BUF" breaking --against "$BASELINE" \
      || die "proto/ breaks compatibility with $BASELINE: make the change additive"
    current="$RUN/contracts.binpb"
    mkdir -p "$RUN"
    build "$current"
    cmp -s "$current" "$BASELINE" || die "the contracts changed but $BASELINE did not: \
buf breaking passed, so after review record the change with 'scripts/contracts.sh update' \
and commit the baseline with it"
    ;;
  update)
    build "$BASELINE"
    say "wrote $BASELINE"
    ;;
  *)
    die "usage: scripts/contracts.sh [check|update]"
    ;;
esac
