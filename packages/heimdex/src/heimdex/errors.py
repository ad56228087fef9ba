"""The project's one error type: everything a user should read as a message, not a traceback."""


class HeimdexError(Exception):
    """An error whose message is complete and actionable on its own.

    Entrypoints (the CLI, Alembic's env.py, the API's exception handlers) print it as one line
    and exit non-zero; they never show a traceback for it.
    """


class DatabaseUnavailable(HeimdexError):
    """PostgreSQL could not be reached or refused the connection."""
