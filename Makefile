# The README's commands. Everything runs through uv, from the workspace's one lock file.
.PHONY: test lint test-containers bench

test: lint
	uv run pytest

lint:
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

# Builds and runs the stack in containers (podman via ../shared/tools/container-lab): minutes.
test-containers:
	bash scripts/test-containers.sh
