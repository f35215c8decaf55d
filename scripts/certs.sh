#!/usr/bin/env bash
# Makes a local CA and one certificate per service and caller in .data/certs (or $1), for
# `scripts/dev.sh --tls` and for calling the services with mutual TLS by hand (README).
# Development only: in Kubernetes, cert-manager issues them (deploy/k8s).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
dir="${1:-$ROOT/.data/certs}"
have cargo || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
say "making a local CA and certificates in $dir"
cargo run --quiet -p mall-test-support --bin mall-certs -- "$dir"
