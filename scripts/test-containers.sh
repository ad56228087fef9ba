#!/usr/bin/env bash
# The container proof: build the stack from this checkout, run every command of the migration
# playbook (shared/seed/alembic-migration-playbook.md) verbatim with `docker compose` replaced by
# `podman-compose`, push one job through the API to a worker, and tear everything down.
#
#   scripts/test-containers.sh          (or: make test-containers)
#
# Uses ../shared/tools/container-lab from the repository root (podman + runc + podman-compose and
# local stand-ins for the base images; there is no Docker engine here). Prints one line per step
# with PASS/FAIL and its duration, and exits non-zero when any step failed.
#
# Knobs (environment):
#   CONTAINER_LAB               path to container-lab (default: <repo>/../shared/tools/container-lab)
#   COMPOSE_PROJECT_NAME        compose project (default heimdex-ct, so a dev stack is not touched)
#   API_HOST_PORT               host port of the API (default 8000)
#   HEIMDEX_CT_EXTRA_COMPOSE    extra compose files for `up`/`down` (space-separated), e.g. the
#                               dev override; the playbook commands use deploy/docker-compose.yml
#   HEIMDEX_CT_READY_SECONDS    bound on waiting for /readyz (default 180)
#   HEIMDEX_CT_JOB_SECONDS      bound on waiting for the job to finish (default 120)
#   HEIMDEX_CT_KEEP=1           leave the stack up at the end (for debugging)
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
lab=${CONTAINER_LAB:-$repo/../shared/tools/container-lab}
if [ ! -x "$lab" ]; then
  echo "test-containers: container-lab not found at $lab (set CONTAINER_LAB)" >&2
  exit 2
fi

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-heimdex-ct}
export API_HOST_PORT=${API_HOST_PORT:-8000}
ready_seconds=${HEIMDEX_CT_READY_SECONDS:-180}
job_seconds=${HEIMDEX_CT_JOB_SECONDS:-120}
project=$COMPOSE_PROJECT_NAME
api_url=http://127.0.0.1:$API_HOST_PORT
compose_files=(-f deploy/docker-compose.yml)
for extra in ${HEIMDEX_CT_EXTRA_COMPOSE:-}; do compose_files+=(-f "$extra"); done

work=$(mktemp -d)
failures=0
results=()

now() { date +%s.%N; }

# step NAME COMMAND...: runs COMMAND with its output in a log, prints NAME, PASS/FAIL, seconds.
step() {
  local name=$1; shift
  local log; log="$work/$(printf '%02d' "${#results[@]}").log"
  local t0 t1 rc
  t0=$(now)
  "$@" >"$log" 2>&1
  rc=$?
  t1=$(now)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local verdict=PASS
  if [ "$rc" -ne 0 ]; then
    verdict=FAIL
    failures=$((failures + 1))
  fi
  results+=("$(printf '%-52s %s %7ss' "$name" "$verdict" "$secs")")
  printf '%-52s %s %7ss\n' "$name" "$verdict" "$secs"
  if [ "$rc" -ne 0 ]; then
    sed 's/^/    | /' "$log" | tail -n 40
  fi
  return "$rc"
}

container_of() {  # the running container of a service in this project
  podman ps --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}

lab_ready() {
  if ! command -v podman-compose >/dev/null 2>&1 \
    || ! podman image exists localhost/lab/python \
    || ! podman image exists localhost/lab/postgres; then
    "$lab" setup || return 1
  fi
  "$lab" status
}

up() {
  podman-compose "${compose_files[@]}" up -d --build
}

teardown() {
  podman-compose "${compose_files[@]}" down -v
}

migrate_exited_zero() {
  local name code
  name=$(podman ps -a --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=migrate" --format '{{.Names}}' | head -n 1)
  [ -n "$name" ] || { echo "no migrate container"; return 1; }
  code=$(timeout "$ready_seconds" podman wait "$name") || { echo "migrate did not finish"; return 1; }
  podman logs "$name"
  echo "migrate exit code: $code"
  [ "$code" = 0 ]
}

wait_readyz() {
  local deadline=$((SECONDS + ready_seconds)) body
  while [ "$SECONDS" -lt "$deadline" ]; do
    if body=$(curl -fsS --max-time 3 "$api_url/readyz" 2>&1); then
      echo "$body"
      return 0
    fi
    sleep 2
  done
  echo "no 200 from $api_url/readyz within ${ready_seconds}s; last answer: $body"
  local api; api=$(container_of api)
  [ -n "$api" ] && podman logs --tail 30 "$api"
  return 1
}

versions_in_api() {
  podman exec "$(container_of api)" ls -1 /app/packages/common/alembic/versions | grep '\.py$' | sort
}

# --- the playbook, verbatim (docker compose -> podman-compose) ---------------------------------

playbook_autogenerate() {
  podman-compose -f deploy/docker-compose.yml exec -u appuser api bash -lc '\
  cd /app/packages/common && \
  ALEMBIC_CONFIG=/app/packages/common/alembic.ini \
  PYTHONPATH=/app/packages/common/src \
  python -m alembic revision --autogenerate -m "hardening: job ledger enums/indexes/idempotency"'
}

playbook_upgrade_head() {
  podman-compose -f deploy/docker-compose.yml exec -u appuser api bash -lc '\
  cd /app/packages/common && \
  ALEMBIC_CONFIG=/app/packages/common/alembic.ini \
  PYTHONPATH=/app/packages/common/src \
  python -m alembic upgrade head'
}

playbook_downgrade_001() {
  podman-compose -f deploy/docker-compose.yml exec -u appuser api bash -lc '\
  cd /app/packages/common && \
  ALEMBIC_CONFIG=/app/packages/common/alembic.ini \
  PYTHONPATH=/app/packages/common/src \
  python -m alembic downgrade 001_job_ledger_init'
}

playbook_compile_sql() {
  podman-compose -f deploy/docker-compose.yml exec -u appuser api bash -lc '\
     cd /app/packages/common && \
     ALEMBIC_CONFIG=/app/packages/common/alembic.ini \
     PYTHONPATH=/app/packages/common/src \
     python -m alembic upgrade 001_job_ledger_init:3af4686817cc --sql \
     > /tmp/0002_job_ledger_hardening.sql'
}

# --- checks around the playbook ---------------------------------------------------------------

# On a clean tree autogenerate must find nothing: either no file, or one whose upgrade() and
# downgrade() hold no operation. The file is then removed so the image stays at head.
autogenerate_is_empty() {
  local before after new api
  api=$(container_of api)
  before=$(versions_in_api) || return 1
  playbook_autogenerate || return 1
  after=$(versions_in_api) || return 1
  new=$(comm -13 <(echo "$before") <(echo "$after"))
  if [ -z "$new" ]; then
    echo "autogenerate wrote no revision (no changes detected)"
    return 0
  fi
  if [ "$(echo "$new" | wc -l)" -ne 1 ]; then
    echo "expected at most one new revision, got: $new"
    return 1
  fi
  echo "generated: $new"
  podman exec -u appuser "$api" cat "/app/packages/common/alembic/versions/$new"
  # Autogenerate writes its operations between the template's marker comments; anything else in
  # the bodies (the lock_timeout preamble) comes from script.py.mako.
  podman exec -i -u appuser "$api" python - "/app/packages/common/alembic/versions/$new" <<'PY'
import re
import sys

text = open(sys.argv[1]).read()
blocks = re.findall(
    r"# ### commands auto generated by Alembic.*?###\n(.*?)# ### end Alembic commands ###",
    text,
    re.S,
)
if len(blocks) != 2:
    sys.exit(f"expected 2 autogenerate blocks (upgrade, downgrade), found {len(blocks)}")
for name, block in zip(("upgrade", "downgrade"), blocks):
    if block.strip() != "pass":
        sys.exit(f"{name}() has operations: the models and the migrated schema differ")
print("upgrade() and downgrade() hold no operations")
PY
  local rc=$?
  podman exec -u appuser "$api" rm -f "/app/packages/common/alembic/versions/$new" || rc=1
  [ "$(versions_in_api)" = "$before" ] || { echo "versions directory not restored"; rc=1; }
  return "$rc"
}

compiled_sql_matches_repo() {
  local expected=supabase/migrations/0002_job_ledger_hardening.sql
  local got="$work/0002_job_ledger_hardening.sql"
  podman cp "$(container_of api):/tmp/0002_job_ledger_hardening.sql" "$got" || return 1
  echo "copied out: $(wc -l <"$got") lines"
  if [ ! -f "$expected" ]; then
    echo "$expected is missing from the repository: nothing to compare the compiled SQL with"
    return 1
  fi
  diff -u "$expected" "$got" && echo "identical to $expected"
}

job_through_api() {
  local api org token body job status deadline
  api=$(container_of api)
  org=$(python3 -c 'import uuid; print(uuid.uuid4())')
  token=$(podman exec -u appuser "$api" heimdex dev-token --org "$org") || return 1
  token=$(echo "$token" | tail -n 1 | tr -d '\r')
  body=$(curl -fsS --max-time 10 -X POST "$api_url/jobs" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"type": "mock_process", "params": {"stage_seconds": 0.1}}') || return 1
  echo "submitted: $body"
  job=$(echo "$body" | python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("id") or d["job_id"])') \
    || return 1
  deadline=$((SECONDS + job_seconds))
  while [ "$SECONDS" -lt "$deadline" ]; do
    body=$(curl -fsS --max-time 10 "$api_url/jobs/$job" -H "Authorization: Bearer $token") || return 1
    status=$(echo "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
    case $status in
      succeeded) echo "finished: $body"; return 0 ;;
      failed | canceled | dead_letter) echo "job ended $status: $body"; return 1 ;;
    esac
    sleep 1
  done
  echo "job $job still '$status' after ${job_seconds}s: $body"
  return 1
}

# --- run ----------------------------------------------------------------------------------------

finish() {
  if [ "${HEIMDEX_CT_KEEP:-0}" = 1 ]; then
    echo "HEIMDEX_CT_KEEP=1: stack left up (project $project)"
  else
    step "down -v" teardown
  fi
  echo
  echo "summary (project $project):"
  printf '  %s\n' "${results[@]}"
  if [ "$failures" -ne 0 ]; then
    echo "$failures step(s) FAILED (step logs in $work)"
    exit 1
  fi
  rm -rf "$work"
  echo "all steps PASSED"
}
trap finish EXIT
trap 'exit 130' INT TERM

echo "test-containers: repo $repo, project $project, API $api_url"
step "container-lab ready" lab_ready || exit 1
eval "$("$lab" env)"
step "build + up -d --build" up || exit 1
step "migrate service exited 0" migrate_exited_zero
step "api /readyz answers 200" wait_readyz
step "playbook 1: autogenerate on a clean tree is empty" autogenerate_is_empty
step "playbook 2: upgrade head" playbook_upgrade_head
step "playbook 2: downgrade 001_job_ledger_init" playbook_downgrade_001
step "playbook 2: upgrade head (again)" playbook_upgrade_head
step "playbook 3: compile 001:3af4686817cc --sql to /tmp" playbook_compile_sql
step "playbook 3: copy out, equals supabase/migrations/0002" compiled_sql_matches_repo
step "job through the API finished by a worker" job_through_api
