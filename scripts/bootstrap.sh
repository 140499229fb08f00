# Sourced by scripts/test and scripts/demo: make sure redis-server and a virtualenv with
# nearcache (and the extras named in $NEARCACHE_EXTRAS) exist. Idempotent and quick when done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEARCACHE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to run: $*" >&2; return 1; fi
}

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${NEARCACHE_REDIS_SERVER:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "==> installing redis-server (apt-get)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # Debian starts a system service; the tests and the demo start their own servers.
    as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
  elif command -v brew >/dev/null 2>&1; then
    echo "==> installing redis (brew)"; brew install redis
  else
    echo "redis-server is not installed and no apt-get/brew was found: install Redis >= 6.2" >&2
    exit 2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    as_root apt-get install -y -qq python3-venv >/dev/null
    "$PYTHON" -m venv "$VENV"
  fi
fi
stamp="$VENV/.nearcache-${NEARCACHE_EXTRAS:-base}"
# The C accelerator is built in place by the editable install: rebuild when its source or
# setup.py changed (a stale build is refused at import, and the tests say so).
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] \
  || [ "$ROOT/src/nearcache/_core/_speedups.c" -nt "$stamp" ] \
  || [ "$ROOT/src/nearcache/_core/_wire.c" -nt "$stamp" ]; then
  echo "==> installing nearcache[${NEARCACHE_EXTRAS:-}] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$ROOT${NEARCACHE_EXTRAS:+[$NEARCACHE_EXTRAS]}"
  touch "$stamp"
fi
