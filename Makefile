# Shortcuts for the scripts the README names.
.PHONY: test lint bench test-containers test-failover

test:
	scripts/test

lint:
	uv run ruff check .
	uv run ruff format --check .
	uv run lint-imports
	scripts/lint-deploy
	uv run mypy

bench:
	uv run python bench/migration_hardening.py

# Switchovers and kills of the primary of a pg_auto_failover formation: TRIALS each way (5).
test-failover:
	uv run python bench/failover.py --trials $(or $(TRIALS),5)

# The upstream walk-through, against `heimdex dev` (reads .heimdex/dev.env that it writes).
.PHONY: dev demo
dev:
	uv run heimdex dev

DEMO_ENV = . ./.heimdex/dev.env && H="Authorization: Bearer $$HEIMDEX_TOKEN"
JQ_ID = python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
SHOW = python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["status"], "attempt", j["attempt"], "/", j["max_attempts"], "stage", j["stage"], "progress", j["progress"], (j["last_error"] or {}).get("code") or "")'

demo:
	@test -f .heimdex/dev.env || { echo "start the stack first: make dev (in another terminal)"; exit 1; }
	@$(DEMO_ENV); \
	echo "== submit mock_process"; \
	ID=$$(curl -sf -X POST "$$HEIMDEX_URL/jobs" -H "$$H" -H 'Content-Type: application/json' \
	  -d '{"type":"mock_process","params":{"stage_seconds":1}}' | $(JQ_ID)); echo "job $$ID"; \
	for i in 1 2 3 4 5; do curl -sf "$$HEIMDEX_URL/jobs/$$ID" -H "$$H" | $(SHOW); sleep 1; done; \
	echo "== events"; curl -sf "$$HEIMDEX_URL/jobs/$$ID/events" -H "$$H" | python3 -c \
	  'import json,sys; [print(e["ts"], e["prev_status"], "->", e["next_status"], e["detail"]) for e in json.load(sys.stdin)["items"]]'; \
	echo "== submit a job failing at 'analyzing' (max_attempts 3, fixed backoff of HEIMDEX_BACKOFF_BASE_SECONDS)"; \
	F=$$(curl -sf -X POST "$$HEIMDEX_URL/jobs" -H "$$H" -H 'Content-Type: application/json' \
	  -d '{"type":"mock_process","params":{"stage_seconds":0.2,"fail_at_stage":"analyzing"},"max_attempts":3,"backoff_policy":"fixed"}' | $(JQ_ID)); \
	echo "job $$F"; \
	for i in 1 2 3 4 5 6 7 8; do curl -sf "$$HEIMDEX_URL/jobs/$$F" -H "$$H" | $(SHOW); sleep 1; done; \
	echo "== idempotency: the same key twice"; \
	for i in 1 2; do curl -s -o /dev/null -w "%{http_code}\n" -X POST "$$HEIMDEX_URL/jobs" -H "$$H" \
	  -H 'Idempotency-Key: demo-key' -H 'Content-Type: application/json' -d '{"type":"noop"}'; done; \
	echo "== readiness"; curl -s "$$HEIMDEX_URL/readyz"; echo

# Builds and runs the stack in containers (podman via ../shared/tools/container-lab): minutes.
test-containers:
	bash scripts/test-containers.sh
