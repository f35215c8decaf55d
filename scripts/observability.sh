#!/usr/bin/env bash
# Checks deploy/observability and deploy/compose, offline:
#   - the generated dashboards and SLO rules are what deploy/observability/generate.py makes
#     (grafanalib, from PyPI, pinned below, in .tools/observability-venv);
#   - promtool check config (Kubernetes and compose scrape configurations), check rules and
#     test rules (a unit test for every alert);
#   - every alert fires in a test and has a RUNBOOK.md section, every SLO is in SLO.md, and the
#     configurations of what cannot be installed here (OpenTelemetry Collector, Tempo, Loki,
#     Grafana, Fluent Bit) are well-formed and link to each other (structure only:
#     deploy/observability/check.py);
#   - docker-compose config -q on deploy/compose (no Docker engine needed).
# Installs Debian's prometheus (promtool; the end-to-end Prometheus test runs its server) and
# docker-compose packages when missing and it can; otherwise says how.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

GRAFANALIB_VERSION="0.7.1"
PYYAML_VERSION="6.0.2"
VENV="$TOOLS/observability-venv"
OBS="deploy/observability"

if ! have promtool || ! have prometheus; then
  say "installing Debian's prometheus package (promtool, and the server the end-to-end test runs)"
  apt_install prometheus || die "prometheus and promtool are missing: install Debian's prometheus
package (apt-get install prometheus) or put both on PATH, then run this again"
  # The package starts a server on :9090 where an init system runs; the tests start their own.
  service prometheus stop >/dev/null 2>&1 || true
fi
if ! have docker-compose; then
  say "installing Debian's docker-compose package (to check deploy/compose; no engine is needed)"
  apt_install docker-compose || die "docker-compose is missing: install Debian's docker-compose
package (apt-get install docker-compose), then run this again"
fi

marker="$VENV/.installed-$GRAFANALIB_VERSION-$PYYAML_VERSION"
if [ ! -f "$marker" ]; then
  say "installing grafanalib $GRAFANALIB_VERSION into .tools/observability-venv"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "could not create a virtual environment (is python3's venv module installed?)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "grafanalib==$GRAFANALIB_VERSION" "pyyaml==$PYYAML_VERSION" \
    || die "pip could not install grafanalib from PyPI"
  touch "$marker"
fi

say "dashboards and SLO rules match deploy/observability/generate.py"
"$VENV/bin/python" "$OBS/generate.py" --check

say "promtool check config, check rules, test rules"
promtool check config --syntax-only "$OBS/prometheus/prometheus.yml" >/dev/null
promtool check config --syntax-only deploy/compose/prometheus.yml >/dev/null
promtool check rules "$OBS"/prometheus/rules/*.yml >/dev/null
promtool test rules "$OBS"/prometheus/tests/*.test.yml

say "alerts tested and documented; collector, Tempo, Loki, Grafana, Fluent Bit well-formed (structure only)"
"$VENV/bin/python" "$OBS/check.py"

say "docker-compose config -q (deploy/compose)"
docker-compose -f deploy/compose/docker-compose.yml config -q
