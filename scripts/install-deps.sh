#!/usr/bin/env bash
# Installs what Heimdex needs on a Debian machine and is missing: the PostgreSQL server binaries,
# pgbouncer (the pooler tests run Heimdex through it), pg_auto_failover (the failover harness),
# make, uv, chromium (the dashboard's browser test drives it; Playwright never downloads a
# browser of its own) and npm (the Supabase CLI test installs the real CLI with it); then syncs
# the workspace from uv.lock. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
command -v pg_autoctl >/dev/null 2>&1 || need+=(postgresql-15-auto-failover)
command -v make >/dev/null 2>&1 || need+=(make)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if ! command -v uv >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  need+=(python3-pip)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]} (apt)" >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi

# pip --user puts uv in ~/.local/bin: look there too, so a second run does not reinstall it.
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  echo "install-deps: installing uv (pip)" >&2
  python3 -m pip install -q --user uv 2>/dev/null \
    || python3 -m pip install -q --user --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi

# --compile-bytecode: the tests start about a hundred Python subprocesses (the CLI, workers, the
# API); where PYTHONDONTWRITEBYTECODE is set (CI images often do) each would otherwise compile
# sqlalchemy, fastapi, pydantic and the rest from source again (the suite took 259-301 s on a
# fresh clone without it, 212 s with it, on 2 cores).
uv sync --frozen --quiet --compile-bytecode
