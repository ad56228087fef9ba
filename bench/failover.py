"""Heimdex through primary failures: a pg_auto_failover formation, the API, two workers and a
client submitting steadily, while the primary is switched over or killed, trial after trial.

    uv run python bench/failover.py [--trials 5]        (make test-failover)

pg_auto_failover (Debian: postgresql-15-auto-failover, installed with apt-get when missing): a
monitor and two nodes, a primary and a synchronous standby, run as user postgres in a directory
of their own under /tmp, on free ports of 127.0.0.1. Heimdex reaches them by a multi-host URL
with `target_session_attrs=read-write`: libpq tries the hosts in turn and keeps the one that
accepts writes. Each trial fails the primary one of two ways, alternating:

- switchover: `pg_autoctl perform switchover` (planned: the standby catches up, then swaps);
- kill: the primary's node dies, `kill -9` of its pg_autoctl processes and of its postmaster (by
  the PIDs in their pid files); the monitor fails over to the standby once its health checks give
  the node up, and the harness starts the dead node again: it rejoins as the standby. (Killing
  the postmaster alone is a crash restart on the same node: its pg_autoctl starts it again in
  seconds, no failover.)

Per trial, from the client's submissions and the database after the trial:
- accepted: submissions answered 2xx; missing: accepted jobs not in the table afterwards;
- run twice: jobs whose handler started more than once (it records each start in
  `failover_run`), and how many of them had a lease expire (the only way a second start is
  allowed: a worker cut off past its lease while the job ran);
- 503 s: from the first failed submission to the first success after the last one;
- claim gap s: the longest pause between two claims of one worker, the worse worker.
After the last trial every accepted job must end `succeeded`, with one outcome each.

`run(trials)` returns the rows and the final check (the pytest test in tests/failover/ calls it
with one trial each way).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BINDIR = Path("/usr/lib/postgresql/15/bin")
SECRET = "failover-secret-0123456789-0123456789-01"  # noqa: S105 - a throwaway formation's
RATE = 20.0  # submissions per second
# What production runs: leases long enough that a failover does not expire them.
WORKER_ENV = {
    "HEIMDEX_WORKER_CONCURRENCY": "4",
    "HEIMDEX_POLL_INTERVAL_SECONDS": "0.5",
    "HEIMDEX_LEASE_SECONDS": "30",
    "HEIMDEX_HEARTBEAT_SECONDS": "5",
    "HEIMDEX_REAPER_INTERVAL_SECONDS": "2",
    "HEIMDEX_SHUTDOWN_GRACE_SECONDS": "5",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_pg_autoctl() -> None:
    if shutil.which("pg_autoctl"):
        return
    print("installing postgresql-15-auto-failover (apt-get)", file=sys.stderr)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "postgresql-15-auto-failover"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )


@dataclass
class Node:
    name: str
    port: int
    pgdata: Path
    keeper: subprocess.Popen[bytes] | None = None


@dataclass
class Formation:
    """A pg_auto_failover monitor and two nodes in `root`, run as user postgres."""

    root: Path
    monitor_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    monitor: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls) -> Formation:
        root = Path(tempfile.mkdtemp(prefix="heimdex-failover-"))
        os.chmod(root, 0o755)  # noqa: S103 - the postgres user works in it
        formation = cls(root)
        formation._chown(root)
        for sub in ("cfg", "share", "run", "log"):
            (root / sub).mkdir()
            formation._chown(root / sub)
        return formation

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _cmd(self, *args: str) -> list[str]:
        env = [
            "env",
            f"PATH={BINDIR}:/usr/bin:/bin",
            f"XDG_CONFIG_HOME={self.root / 'cfg'}",
            f"XDG_DATA_HOME={self.root / 'share'}",
            f"XDG_RUNTIME_DIR={self.root / 'run'}",
            "PG_AUTOCTL_DEBUG=0",
        ]
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return [*user, *env, "pg_autoctl", *args]

    def autoctl(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args)}: {proc.stderr.strip()[-800:]}")
        return proc.stdout

    def _spawn(self, pgdata: Path, log: str) -> subprocess.Popen[bytes]:
        with (self.root / "log" / log).open("ab") as out:
            return subprocess.Popen(
                self._cmd("run", "--pgdata", str(pgdata)), stdout=out, stderr=out
            )

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover?sslmode=disable"

    def start(self) -> None:
        mon = self.root / "monitor"
        self.autoctl(
            "create", "monitor", "--pgdata", str(mon), "--pgport", str(self.monitor_port),
            "--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--auth", "trust", "--no-ssl",
        )  # fmt: skip
        self.monitor = self._spawn(mon, "monitor.log")
        wait(self._monitor_up, "the monitor", 60)
        for i in (1, 2):
            node = Node(f"node{i}", free_port(), self.root / f"node{i}")
            self.autoctl(
                "create", "postgres", "--pgdata", str(node.pgdata), "--pgport", str(node.port),
                "--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--name", node.name,
                "--monitor", self.monitor_uri, "--auth", "trust", "--no-ssl",
                "--dbname", "heimdex",
            )  # fmt: skip
            node.keeper = self._spawn(node.pgdata, f"{node.name}.log")
            self.nodes.append(node)
            if i == 1:
                wait(lambda: self.primary() is not None, "the first node to be primary", 90)
        self.wait_stable()

    def _monitor_up(self) -> bool:
        try:
            psycopg.connect(self.monitor_uri, connect_timeout=2).close()
        except psycopg.Error:
            return False
        return True

    def state(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = json.loads(
            self.autoctl("show", "state", "--pgdata", str(self.root / "monitor"), "--json")
        )
        return nodes

    def primary(self) -> Node | None:
        try:
            states = self.state()
        except (RuntimeError, json.JSONDecodeError):
            return None
        for s in states:
            if s["current_group_state"] in ("primary", "wait_primary", "single"):
                return next(n for n in self.nodes if n.port == s["nodeport"])
        return None

    def stable(self) -> bool:
        try:
            states = sorted(
                (s["current_group_state"], s["assigned_group_state"]) for s in self.state()
            )
        except (RuntimeError, json.JSONDecodeError):
            return False
        return states == [("primary", "primary"), ("secondary", "secondary")]

    def wait_stable(self, timeout: float = 180) -> None:
        wait(self.stable, "a primary and a synchronous secondary", timeout)

    @property
    def hosts(self) -> str:
        return "&".join(f"host=127.0.0.1:{n.port}" for n in self.nodes)

    def url(self) -> str:
        return (
            f"postgresql://postgres@/heimdex?{self.hosts}"
            "&target_session_attrs=read-write&connect_timeout=3"
        )

    def conninfo(self) -> str:
        return (
            "host=" + ",".join("127.0.0.1" for _ in self.nodes)
            + " port=" + ",".join(str(n.port) for n in self.nodes)
            + " dbname=heimdex user=postgres target_session_attrs=read-write connect_timeout=3"
        )  # fmt: skip

    def switchover(self) -> None:
        self.autoctl("perform", "switchover", "--pgdata", str(self.root / "monitor"), timeout=180)

    def kill_primary(self) -> Node:
        """`kill -9` of the primary's pg_autoctl processes, then of its postmaster."""
        node = self.primary()
        assert node is not None, "no primary to kill"
        pids: list[int] = []
        pidfile = next((self.root / "run").rglob(f"{node.name}/pg_autoctl.pid"), None)
        if pidfile is not None:
            lines = pidfile.read_text().splitlines()
            pids.append(int(lines[0]))
            pids += [int(line.split()[0]) for line in lines[5:] if line.strip()]
        postmaster = int((node.pgdata / "postmaster.pid").read_text().splitlines()[0])
        for pid in [*pids, postmaster]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.keeper is not None:
            node.keeper.wait()
        return node

    def restart(self, node: Node) -> None:
        node.keeper = self._spawn(node.pgdata, f"{node.name}.log")

    def stop(self) -> None:
        keepers = [n.keeper for n in self.nodes if n.keeper] + (
            [self.monitor] if self.monitor else []
        )
        for proc in keepers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in keepers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            # The processes' logs stay for a look at what happened (log/).
            for path in self.root.iterdir():
                if path.name != "log":
                    shutil.rmtree(path, ignore_errors=True)


def wait(predicate: Callable[[], object], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f}s")


@dataclass
class Submission:
    n: int
    at: float
    status: int  # 0: no answer (connection refused or timed out)
    job_id: uuid.UUID | None


class Client(threading.Thread):
    """Submits one `failover_probe` job every 1/RATE s, one keep-alive connection, and notes each
    answer; a failed request gets a new connection."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(name="client", daemon=True)
        self.port = port
        self.token = token
        self.done: list[Submission] = []
        self.stop = threading.Event()
        self.n = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.n += 1
            body = json.dumps({"type": "failover_probe", "params": {"n": self.n}})
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            at = time.time()
            try:
                conn.request("POST", "/jobs", body, headers)
                response = conn.getresponse()
                payload = response.read()
                job_id = uuid.UUID(json.loads(payload)["id"]) if response.status < 300 else None
                self.done.append(Submission(self.n, at, response.status, job_id))
            except (OSError, http.client.HTTPException):
                self.done.append(Submission(self.n, at, 0, None))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            next_at += 1 / RATE
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        conn.close()


@dataclass
class Trial:
    kind: str
    started: float
    fault_at: float
    ended: float
    primary_before: str
    primary_after: str
    accepted: int = 0
    missing: int = 0
    run_twice: int = 0
    run_twice_after_expiry: int = 0
    unavailable_s: float = 0.0
    failed_requests: int = 0
    answers: str = ""
    failed_but_stored: int = 0
    claim_gap_s: float = 0.0

    def row(self) -> str:
        return (
            f"| {self.kind:<10} | {self.primary_before} → {self.primary_after} "
            f"| {self.accepted:>8} | {self.missing:>7} "
            f"| {self.run_twice:>4} ({self.run_twice_after_expiry}) "
            f"| {self.failed_requests:>6} {self.answers:<16} | {self.failed_but_stored:>6} "
            f"| {self.unavailable_s:>5.1f} | {self.claim_gap_s:>11.1f} |"
        )


HEADER = (
    "| trial      | primary        | accepted | missing | run twice (lease expired) "
    "| failed (answers)        | stored | 503 s | claim gap s |\n"
    "|------------|----------------|---------:|--------:|--------------------------:"
    "|-------------------------|-------:|------:|------------:|"
)


@contextmanager
def stack(formation: Formation, logs: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """Migrations, then the API and two workers on the multi-host URL."""
    env = {
        **os.environ,
        **WORKER_ENV,
        "DATABASE_URL": formation.url(),
        "FAILOVER_CONNINFO": formation.conninfo(),
        "HEIMDEX_JWT_SECRET": SECRET,
        "HEIMDEX_ENV": "local",
        "HEIMDEX_LOG_FORMAT": "json",
        "HEIMDEX_JOB_MODULES": "failover_jobs:jobs",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, "-m", "heimdex", "db", "upgrade"], env=env, check=True, cwd=REPO,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    with psycopg.connect(formation.conninfo(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS failover_run (run uuid PRIMARY KEY, n bigint NOT NULL,"
            " attempt int NOT NULL, pid int NOT NULL, started double precision NOT NULL)"
        )
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        with (logs / f"{name}.log").open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "heimdex", *args],
                    env=env,
                    cwd=REPO,
                    stdout=out,
                    stderr=out,
                )
            )

    start("api", "api", "--port", str(port))
    start("worker-1", "worker")
    start("worker-2", "worker")
    wait(lambda: _ready(port), "the API", 60)
    try:
        yield port, procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/readyz")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return False
    return ok


def measure(trial: Trial, client: Client, conninfo: str) -> None:
    window = [s for s in client.done if trial.started <= s.at < trial.ended]
    accepted = [s.job_id for s in window if s.job_id is not None]
    trial.accepted = len(accepted)
    failed = [s for s in window if not 200 <= s.status < 300]
    trial.failed_requests = len(failed)
    codes = Counter(s.status for s in failed)
    trial.answers = " ".join(f"{code or 'none'}: {k}" for code, k in sorted(codes.items()))
    if failed:
        last = failed[-1].at
        recovered = next((s.at for s in window if s.at > last and 200 <= s.status < 300), last)
        trial.unavailable_s = recovered - failed[0].at
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = {
            row[0] for row in conn.execute("SELECT id FROM job WHERE id = ANY(%s)", (accepted,))
        }
        trial.missing = len(set(accepted) - found)
        stored = conn.execute(
            "SELECT count(*) FROM job WHERE type = 'failover_probe'"
            " AND (params->>'n')::bigint = ANY(%s)",
            ([s.n for s in failed],),
        ).fetchone()
        trial.failed_but_stored = int(stored[0]) if stored else 0
        gaps = conn.execute(
            """
            SELECT coalesce(max(gap), 0) FROM (
              SELECT extract(epoch FROM ts - lag(ts) OVER (PARTITION BY detail_json->>'worker'
                                                           ORDER BY ts)) AS gap
                FROM job_event
               WHERE detail_json->>'action' = 'claimed'
                 AND ts BETWEEN to_timestamp(%s) AND to_timestamp(%s)) g
            """,
            (trial.started, trial.ended),
        ).fetchone()
        trial.claim_gap_s = float(gaps[0]) if gaps else 0.0


def final_check(
    client: Client, conninfo: str, trials: list[Trial], timeout: float = 180
) -> dict[str, int]:
    """Wait for every accepted job to end; count what did not succeed exactly once, and the
    jobs run twice per trial (by the `n` each run recorded)."""
    accepted = [s.job_id for s in client.done if s.job_id is not None]
    with psycopg.connect(conninfo, autocommit=True) as conn:

        def unfinished() -> int:
            row = conn.execute(
                "SELECT count(*) FROM job WHERE id = ANY(%s) AND status IN ('queued', 'running')",
                (accepted,),
            ).fetchone()
            return int(row[0]) if row else 0

        deadline = time.monotonic() + timeout
        while unfinished() and time.monotonic() < deadline:
            time.sleep(1)
        result = {"accepted": len(accepted)}
        row = conn.execute(
            """
            SELECT count(*) FILTER (WHERE j.id IS NULL),
                   count(*) FILTER (WHERE j.status <> 'succeeded'),
                   count(*) FILTER (WHERE (SELECT count(*) FROM job_event e WHERE e.job_id = j.id
                                            AND e.next_status = 'succeeded') > 1)
              FROM unnest(%s::uuid[]) AS a(id) LEFT JOIN job j ON j.id = a.id
            """,
            (accepted,),
        ).fetchone()
        assert row is not None
        result["missing"], result["not_succeeded"], result["succeeded_twice"] = (
            int(row[0]), int(row[1]), int(row[2]),
        )  # fmt: skip
        twice = conn.execute(
            """
            SELECT r.n, bool_or(EXISTS (SELECT 1 FROM job_event e WHERE e.job_id = j.id
                                         AND e.detail_json->>'action' = 'lease_expired'))
              FROM failover_run r
              LEFT JOIN job j ON (j.params->>'n')::bigint = r.n AND j.id = ANY(%s)
             GROUP BY r.n HAVING count(*) > 1
            """,
            (accepted,),
        ).fetchall()
    submitted_at = {s.n: s.at for s in client.done}
    for n, expired in twice:
        at = submitted_at.get(int(n), 0.0)
        # The last trial started before the submission (those after the last one: its own).
        trial = next((t for t in reversed(trials) if t.started <= at), trials[0])
        trial.run_twice += 1
        trial.run_twice_after_expiry += int(bool(expired))
    result["run_twice"] = len(twice)
    result["run_twice_without_expiry"] = sum(1 for _, expired in twice if not expired)
    return result


def run(trials: int, *, quiet: bool = False) -> tuple[list[Trial], dict[str, int]]:
    """`trials` switchovers and `trials` kills, alternating; the trials and the final check."""
    ensure_pg_autoctl()
    formation = Formation.create()
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    done: list[Trial] = []
    try:
        started = time.monotonic()
        formation.start()
        say(f"formation up in {time.monotonic() - started:.0f}s: {formation.root}")
        from heimdex_api.auth import issue_token  # noqa: PLC0415 - the workspace's package

        token = issue_token(SECRET, org_id=uuid.uuid4(), sub="failover")
        with stack(formation, formation.root / "log") as (port, _procs):
            client = Client(port, token)
            client.start()
            time.sleep(5)
            for i in range(2 * trials):
                kind = ("switchover", "kill")[i % 2]
                before = formation.primary()
                assert before is not None
                # Back to back: every submission belongs to one trial.
                trial_started = done[-1].ended if done else time.time()
                time.sleep(3)
                fault_at = time.time()
                if kind == "switchover":
                    formation.switchover()
                else:
                    dead = formation.kill_primary()
                    wait(
                        lambda dead=dead: formation.primary() not in (None, dead),
                        "the monitor to fail over",
                        120,
                    )
                    formation.restart(dead)
                formation.wait_stable()
                after = formation.primary()
                time.sleep(8)
                trial = Trial(
                    kind, trial_started, fault_at, time.time(),
                    before.name, after.name if after else "?",
                )  # fmt: skip
                measure(trial, client, formation.conninfo())
                done.append(trial)
                say(trial.row())
            client.stop.set()
            client.join()
            final = final_check(client, formation.conninfo(), done)
    finally:
        formation.destroy()
        say(f"logs: {formation.root / 'log'}")
    return done, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials each way (default 5)")
    args = parser.parse_args()
    started = time.monotonic()
    trials, final = run(args.trials)
    print(f"\n{len(trials)} trials, {time.monotonic() - started:.0f}s; "
          f"{RATE:.0f} submissions/s; lease {WORKER_ENV['HEIMDEX_LEASE_SECONDS']}s\n")  # fmt: skip
    print(HEADER)
    for trial in trials:
        print(trial.row())
    print(
        f"\nafter the last trial: {final['accepted']} accepted, {final['missing']} missing, "
        f"{final['not_succeeded']} not succeeded, {final['succeeded_twice']} succeeded twice, "
        f"{final['run_twice']} run twice "
        f"({final['run_twice_without_expiry']} without a lease expiry)"
    )
    bad = final["missing"] + final["not_succeeded"] + final["succeeded_twice"]
    sys.exit(1 if bad or final["run_twice_without_expiry"] else 0)


if __name__ == "__main__":
    main()
