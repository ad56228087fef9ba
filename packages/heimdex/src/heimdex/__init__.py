"""Heimdex core runtime library: settings, database, models, the job ledger, logs, metrics, CLI."""

__version__ = "0.1.0"
