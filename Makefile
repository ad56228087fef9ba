# Shortcuts for the scripts the README names.
.PHONY: test lint bench

test:
	scripts/test

lint:
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

bench:
	uv run python bench/migration_hardening.py
