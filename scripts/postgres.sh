#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers at $MALL_TEST_POSTGRES_URL for the tests.
#   1. already reachable: nothing to do;
#   2. installed but stopped (a Debian cluster): start it;
#   3. not installed, and this machine can apt-get: install it, start it, give the postgres
#      user a password for TCP logins.
# Prints the URL to use on stdout; fails with what to do when none of that works.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

url="${MALL_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
hostport="${url#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=5432

can_login() { PGCONNECT_TIMEOUT=3 psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }

start_debian_clusters() {
  have pg_lsclusters || return 1
  pg_lsclusters -h 2>/dev/null | while read -r version cluster _; do
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start >/dev/null 2>&1 || true
  done
}

if ! port_open "$host" "$port"; then
  say "PostgreSQL is not answering on $host:$port; trying to start it"
  start_debian_clusters || true
  for _ in $(seq 1 20); do port_open "$host" "$port" && break; sleep 0.5; done
fi

if ! port_open "$host" "$port" && [ -z "${MALL_TEST_POSTGRES_URL:-}" ]; then
  say "installing PostgreSQL from Debian packages"
  if apt_install postgresql postgresql-client; then
    start_debian_clusters || true
    for _ in $(seq 1 20); do port_open "$host" "$port" && break; sleep 0.5; done
    # A fresh Debian cluster allows TCP logins by password only.
    su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
    url="postgres://postgres:postgres@127.0.0.1:5432/postgres"
  fi
fi

have psql || apt_install postgresql-client || true
port_open "$host" "$port" || die "no PostgreSQL at $host:$port, and it could not be started or installed here.
Start one (for example 'pg_ctlcluster 15 main start', or 'apt-get install postgresql') and, if it is not
postgres://postgres@127.0.0.1:5432/postgres, set MALL_TEST_POSTGRES_URL to a URL whose user may CREATE DATABASE."

if have psql; then
  if ! can_login "$url" && can_login "postgres://postgres:postgres@$host:$port/postgres"; then
    url="postgres://postgres:postgres@$host:$port/postgres"
  fi
  can_login "$url" || die "PostgreSQL answers on $host:$port but refuses $url; set MALL_TEST_POSTGRES_URL"
  # Databases left behind by earlier runs (each test makes its own).
  psql "$url" -Atqc "select datname from pg_database where datname like 'mall\_test\_%'" 2>/dev/null \
    | while read -r db; do psql "$url" -qc "drop database if exists \"$db\"" >/dev/null 2>&1 || true; done
fi
echo "$url"
