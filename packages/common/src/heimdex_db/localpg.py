"""A private PostgreSQL cluster started from the machine's own binaries, and the one way to
create a database on a server.

Tooling, not runtime: `heimdex db verify` (a throwaway cluster that needs no configuration),
`heimdex dev` (heimdex_dev), the tests and the benches. No process the image runs reaches it
(import-linter, pyproject.toml). PostgreSQL refuses to run as root, so when we are root the
cluster's files belong to an unprivileged user and its processes run as that user (`runuser`).
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex.settings import DRIVER

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
INSTALL_HINT = (
    "install the PostgreSQL server (Debian: apt-get install -y postgresql) "
    "or set HEIMDEX_PG_BINDIR to the directory holding initdb and pg_ctl"
)


def find_bindir() -> Path:
    """The directory holding `initdb`/`pg_ctl`: `HEIMDEX_PG_BINDIR`, Debian's layout, or PATH."""
    explicit = os.environ.get("HEIMDEX_PG_BINDIR")
    candidates: list[str] = [explicit] if explicit else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise HeimdexError(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def create_database(
    conn: Connection, name: str, *, template: str | None = None, owner: str | None = None
) -> None:
    """`CREATE DATABASE name` on an autocommit connection (the statement refuses a transaction),
    optionally as a copy of `template` and owned by `owner`."""
    quote = conn.dialect.identifier_preparer.quote
    clauses = (f" TEMPLATE {quote(template)}" if template else "") + (
        f" OWNER {quote(owner)}" if owner else ""
    )
    conn.execute(text(f"CREATE DATABASE {quote(name)}{clauses}"))


def ensure_database(admin_url: URL, name: str) -> URL:
    """The URL of database `name` on the server of `admin_url`, created when missing."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                create_database(conn, name)
    finally:
        engine.dispose()
    return admin_url.set(database=name)


def unprivileged_user() -> str | None:
    """The OS user to run PostgreSQL as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("HEIMDEX_PG_OS_USER"), "postgres", "nobody"):
        if not name:
            continue
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise HeimdexError("running as root and no unprivileged user (postgres, nobody) exists")


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in `datadir`, listening on 127.0.0.1:`port` with trust auth.

    `start()` initialises the directory when it is empty and starts the server; `stop()` stops
    it; `destroy()` also removes the directory if we created it.
    """

    datadir: Path
    port: int = field(default_factory=free_port)
    bindir: Path = field(default_factory=find_bindir)
    owns_datadir: bool = False
    # Tests trade durability for speed; benchmarks want what production runs (fsync on).
    durable: bool = False
    # A bench holding thousands of connections raises it; set before `start()`.
    max_connections: int = 200

    @classmethod
    def throwaway(cls, *, durable: bool = False, max_connections: int = 200) -> LocalPostgres:
        parent = Path(tempfile.mkdtemp(prefix="heimdex-pg-"))
        os.chmod(parent, 0o755)  # noqa: S103 - the unprivileged server user must reach it
        return cls(
            datadir=parent / "data",
            owns_datadir=True,
            durable=durable,
            max_connections=max_connections,
        )

    @property
    def socket_dir(self) -> Path:
        return self.datadir.parent

    def url(self, database: str = "postgres") -> URL:
        return URL.create(
            DRIVER, username=SUPERUSER, host="127.0.0.1", port=self.port, database=database
        )

    def create_database(self, name: str, *, template: str | None = None) -> URL:
        """A new database `name` on this cluster (a copy of `template`, if given); its URL."""
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                create_database(conn, name, template=template)
        finally:
            engine.dispose()
        return self.url(name)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        user = unprivileged_user()
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise HeimdexError(f"{args[0]} failed: {' | '.join(detail)}")
        return proc

    def _chown(self, path: Path) -> None:
        user = unprivileged_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def start(self) -> LocalPostgres:
        if not self.initialised():
            self.datadir.mkdir(parents=True, exist_ok=True)
            self._chown(self.datadir)
            self._chown(self.socket_dir)
            logger.info("initdb", extra={"action": "localpg.initdb", "datadir": str(self.datadir)})
            self._run(
                "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections}"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.socket_dir / "postgres.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        logger.info("started", extra={"action": "localpg.start", "port": self.port})
        return self

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            if self.owns_datadir:
                shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
