"""A throwaway pgbouncer in front of a local cluster, for the tests and benches that run
Heimdex behind a pooler: generated ini and userlist, started as the unprivileged user the
throwaway clusters run as (pgbouncer refuses root), stopped by its PID."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

from heimdex.errors import HeimdexError
from heimdex_db.localpg import free_port, unprivileged_user


@dataclass
class Pgbouncer:
    """pgbouncer on 127.0.0.1:`port` pooling every database of the server at `server` (trust
    auth for its user, as the throwaway clusters have)."""

    server: URL
    pool_mode: str = "transaction"
    max_client_conn: int = 200
    default_pool_size: int = 10
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="heimdex-pgb-")))
    process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> URL:
        return self.server.set(host="127.0.0.1", port=self.port, database=database)

    @property
    def log(self) -> Path:
        return self.directory / "pgbouncer.log"

    def start(self) -> Pgbouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise HeimdexError("pgbouncer is not installed (scripts/install-deps.sh installs it)")
        user = self.server.username or "postgres"
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            f"""[databases]
* = host={self.server.host} port={self.server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.directory}/userlist.txt
admin_users = {user}
pool_mode = {self.pool_mode}
max_client_conn = {self.max_client_conn}
default_pool_size = {self.default_pool_size}
ignore_startup_parameters = extra_float_digits
"""
        )
        os_user = unprivileged_user()
        os.chmod(self.directory, 0o755)  # noqa: S103 - the unprivileged user reads its ini
        if os_user is not None:
            entry = pwd.getpwnam(os_user)
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, str(self.directory / "pgbouncer.ini")],
                stdout=log,
                stderr=subprocess.STDOUT,
                user=os_user,
                group=None if os_user is None else pwd.getpwnam(os_user).pw_gid,
                extra_groups=None if os_user is None else [],
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HeimdexError(f"pgbouncer exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise HeimdexError("pgbouncer did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # its own PID: SIGTERM, immediate shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
