#!/usr/bin/env bash
# Usage: deploy/entrypoint.sh COMMAND [ARG...]
# Waits until PostgreSQL accepts connections, then execs COMMAND. Health conditions in
# `depends_on` are not honoured by every compose (podman-compose ignores them), so a one-shot
# step such as `heimdex db upgrade` waits on its own, bounded by HEIMDEX_DB_WAIT_SECONDS.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: entrypoint.sh COMMAND [ARG...]" >&2
  exit 2
fi

limit=${HEIMDEX_DB_WAIT_SECONDS:-60}
case $limit in
  '' | *[!0-9]*)
    echo "entrypoint: HEIMDEX_DB_WAIT_SECONDS must be a whole number of seconds, got '$limit'" >&2
    exit 2
    ;;
esac

probe() {
  # The same settings (DATABASE_URL or PG*) and error text as every heimdex process.
  python - <<'PY'
import sys

from heimdex.db import check_connection, make_engine
from heimdex.errors import HeimdexError
from heimdex.settings import load_settings

try:
    check_connection(make_engine(load_settings().sqlalchemy_url, connect_args={"connect_timeout": 3}))
except HeimdexError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
PY
}

deadline=$((SECONDS + limit))
attempt=1
until reason=$(probe 2>&1); do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "entrypoint: PostgreSQL still unreachable after ${limit}s ($attempt attempts): $reason" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 1
done
echo "entrypoint: PostgreSQL answered (attempt $attempt); running: $*" >&2
exec "$@"
