"""`heimdex dev`: PostgreSQL, the API and a worker on one machine, no Docker. Data persists
under `.heimdex/` in the repository; Ctrl-C stops everything."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from heimdex_common.errors import HeimdexError
from heimdex_common.localpg import LocalPostgres, free_port
from heimdex_common.logs import configure_logging
from heimdex_common.migrations.config import PACKAGE_ROOT, alembic_config
from heimdex_common.settings import Environment, Settings, load_settings

logger = logging.getLogger(__name__)

REPO_ROOT = PACKAGE_ROOT.parents[1]
DATABASE = "heimdex"
CLI = ("-c", "from heimdex_common.cli import main; main()")


def ensure_database(admin_url: URL, name: str) -> URL:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin_url.set(database=name)


def dev_org(state_dir: Path) -> uuid.UUID:
    """The local org, stable across runs so tokens and jobs keep matching."""
    path = state_dir / "dev-org"
    if path.is_file():
        return uuid.UUID(path.read_text().strip())
    org = uuid.uuid4()
    path.write_text(f"{org}\n")
    return org


def ensure_port_free(port: int) -> None:
    """Refuse early: readiness polling would otherwise find whatever else holds the port."""
    with socket.socket() as sock:
        # As the API's server will: only a live listener, not TIME_WAIT leftovers, is "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise HeimdexError(
                f"port {port} is already in use (another Heimdex stack?): stop it, or pass "
                "--port / set HEIMDEX_API_PORT"
            ) from None


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HeimdexError(f"the API exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise HeimdexError(f"the API at {url} was not ready within {timeout:.0f}s")


@dataclass
class DevStack:
    """The processes of the local stack; `start()` then `wait(stop)` then `stop()`."""

    settings: Settings
    state_dir: Path
    api_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    postgres: LocalPostgres | None = None

    def start(self) -> tuple[str, str]:
        from heimdex_api.auth import issue_token  # noqa: PLC0415 - dev only; apps stay apart

        ensure_port_free(self.api_port)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # noqa: S103 - the PostgreSQL user must traverse it
        pg_dir = self.state_dir / "pg"
        pg_dir.mkdir(exist_ok=True)
        os.chmod(pg_dir, 0o755)  # noqa: S103
        self.postgres = LocalPostgres(
            datadir=pg_dir / "data", port=self.settings.dev_port or free_port()
        )
        if (self.postgres.datadir / "postmaster.pid").exists():
            self.postgres.stop()  # left running by a crashed session
        self.postgres.start()
        db_url = ensure_database(self.postgres.url(), DATABASE)
        command.upgrade(alembic_config(database_url=db_url), "head")

        env = {
            **os.environ,
            "DATABASE_URL": db_url.render_as_string(hide_password=False),
            "HEIMDEX_ENV": self.settings.env.value,
        }
        api_url = f"http://127.0.0.1:{self.api_port}"
        for name, args in (
            ("api", ["api", "--host", "127.0.0.1", "--port", str(self.api_port)]),
            ("worker", ["worker"]),
        ):
            self.procs[name] = subprocess.Popen(
                [sys.executable, *CLI, *args], env=env, start_new_session=True
            )
        wait_ready(api_url, self.procs["api"])
        token = issue_token(
            self.settings.jwt_secret.get_secret_value(), org_id=dev_org(self.state_dir)
        )
        (self.state_dir / "dev.env").write_text(
            f"HEIMDEX_URL={api_url}\nHEIMDEX_TOKEN={token}\nDATABASE_URL={env['DATABASE_URL']}\n"
        )
        return api_url, token

    def wait(self, stop: threading.Event) -> str | None:
        """Block until `stop` or until a process dies; the name of a dead process, if any."""
        while not stop.wait(0.5):
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    return name
        return None

    def stop(self) -> None:
        for name in ("api", "worker"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.shutdown_grace_seconds + 5)
            except subprocess.TimeoutExpired:
                logger.warning("killing %s", name, extra={"action": "dev.kill", "proc": name})
                proc.kill()
                proc.wait()
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except HeimdexError as exc:
                logger.warning(str(exc), extra={"action": "dev.pg_stop_failed"})


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), help="API port (default: settings).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / ".heimdex",
    show_default=True,
    help="Where the cluster, dev org and dev.env live.",
)
def dev(port: int | None, state_dir: Path) -> None:
    """Run the whole stack locally (PostgreSQL from the system binaries) until Ctrl-C."""
    settings = load_settings()
    configure_logging()
    if settings.env is Environment.PROD:
        raise HeimdexError("heimdex dev refuses to run with HEIMDEX_ENV=prod")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = DevStack(settings, state_dir.resolve(), port or settings.api_port)
    try:
        url, token = stack.start()
        click.echo(
            f"\nHeimdex is up at {url}\n\nexport HEIMDEX_URL={url}\nexport HEIMDEX_TOKEN={token}\n"
            f'\ncurl -s -X POST "$HEIMDEX_URL/jobs" -H "Authorization: Bearer $HEIMDEX_TOKEN" '
            '-H \'Content-Type: application/json\' -d \'{"type": "mock_process", "params": {}}\''
            f"\n\n(also in {stack.state_dir / 'dev.env'}; `make demo` walks through it)"
            "\nCtrl-C stops everything.\n"
        )
        dead = stack.wait(stop)
    finally:
        stack.stop()
    if dead is not None:
        raise HeimdexError(f"{dead} exited unexpectedly; the stack was stopped (see its log)")
