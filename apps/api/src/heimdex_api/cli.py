"""`heimdex api` and `heimdex dev-token`."""

from __future__ import annotations

import uuid

import click
import uvicorn
from fastapi import FastAPI

from heimdex.errors import HeimdexError
from heimdex.logs import configure_logging
from heimdex.settings import Environment, load_settings
from heimdex_api.app import create_app
from heimdex_api.auth import ADMIN_ROLE, READONLY_ROLE, issue_token


@click.command(
    epilog="""\b
Examples:
  heimdex api                       # http://127.0.0.1:8000, docs at /docs
  HEIMDEX_LOG_FORMAT=json heimdex api --host 0.0.0.0 --port 8080
"""
)
@click.option("--host", help="Interface to bind (default: HEIMDEX_API_HOST or 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: HEIMDEX_API_PORT).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the port (one per core is the usual choice).",
)
def api(host: str | None, port: int | None, workers: int) -> None:
    """Serve the jobs API."""
    settings = load_settings()
    configure_logging("api", **settings.log_options)
    target: str | FastAPI = "heimdex_api.app:app_from_environment" if workers > 1 else (
        create_app(settings)
    )  # fmt: skip
    uvicorn.run(
        target,
        factory=workers > 1,
        workers=workers,
        host=host or settings.api_host,
        port=settings.api_port if port is None else port,
        log_config=None,
    )


@click.command(
    "dev-token",
    epilog="""\b
Examples:
  heimdex dev-token --org "$(cat .heimdex/dev-org)"
  heimdex dev-token --org 2f0c5e0e-8a3a-4f7e-9a39-4b4a0f0c1d2e --ttl 600
  heimdex dev-token --org "$(cat .heimdex/dev-org)" --role heimdex_admin   # the dashboard, /ops
""",
)
@click.option("--org", "org", required=True, help="Organization UUID to put in org_id.")
@click.option("--sub", default="dev-user", show_default=True, help="Subject (user id).")
@click.option("--ttl", default=24 * 3600, show_default=True, help="Lifetime in seconds.")
@click.option(
    "--role",
    type=click.Choice(["authenticated", ADMIN_ROLE, READONLY_ROLE]),
    default="authenticated",
    show_default=True,
    help="The role claim: an operator role opens /ops and the dashboard (/ui).",
)
def dev_token(org: str, sub: str, ttl: int, role: str) -> None:
    """Print a signed token for local use. Refused when HEIMDEX_ENV=prod."""
    settings = load_settings()
    if settings.env is Environment.PROD:
        raise HeimdexError("dev-token refuses to run with HEIMDEX_ENV=prod")
    try:
        org_id = uuid.UUID(org)
    except ValueError:
        raise HeimdexError(f"--org must be a UUID, got {org!r}") from None
    click.echo(
        issue_token(
            settings.jwt_secret.get_secret_value(),
            org_id=org_id,
            sub=sub,
            ttl_seconds=ttl,
            role=role,
        )
    )
