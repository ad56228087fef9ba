"""`heimdex db` as plain functions: history, schema comparison, artifacts, lint, locking."""
