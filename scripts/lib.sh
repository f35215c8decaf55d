# Shared helpers for the scripts in this folder; sourced, not run.
# Every script says what it is doing and, when something is missing, exactly how to get it.

# Repository root, whatever the caller's working directory.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Project-local tools (buf, LocalStack, kinesalite) and runtime state; both are git-ignored.
TOOLS="$ROOT/.tools"
RUN="$ROOT/.run"
mkdir -p "$TOOLS" "$RUN"

# Pinned tool versions: change them here only.
BUF_VERSION="1.75.0"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
warn() { printf '\033[33mwarning: %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror: %s\033[0m\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# apt-get install, when this machine can (root and apt-get present); returns 1 otherwise.
apt_install() {
  have apt-get && [ "$(id -u)" = 0 ] || return 1
  if [ ! -f "$RUN/.apt-updated" ]; then
    apt-get update -qq >/dev/null 2>&1 || return 1
    touch "$RUN/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

# True when something accepts TCP connections at host $1 port $2.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
