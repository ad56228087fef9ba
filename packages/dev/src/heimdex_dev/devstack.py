"""`heimdex dev`: PostgreSQL, the API and a worker on one machine, no Docker. Data persists
under `.heimdex/` in the repository, the processes' logs under `.heimdex/logs/`; Ctrl-C stops
everything."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
from alembic import command

from heimdex.errors import HeimdexError
from heimdex.logs import JsonFormatter, configure_logging, make_formatter, render_json_line
from heimdex.settings import Environment, Settings, load_settings
from heimdex_api.auth import issue_token
from heimdex_db.config import REPO_ROOT, alembic_config
from heimdex_db.localpg import LocalPostgres, ensure_database, free_port

logger = logging.getLogger(__name__)

DATABASE = "heimdex"
CLI = ("-m", "heimdex")
# The dev process's own log file, beside one per child process.
SELF = "dev"
# Pages of the API a person may open, shown in the ready block when the API serves them.
PAGES = {"API docs": "/docs", "Dashboard": "/ui"}


def dev_processes(api_port: int) -> dict[str, list[str]]:
    """The child processes, by name: `heimdex` arguments each. PostgreSQL runs beside them."""
    return {
        "api": ["api", "--host", "127.0.0.1", "--port", str(api_port)],
        "worker": ["worker"],
    }


def dev_org(state_dir: Path) -> uuid.UUID:
    """The local org, stable across runs so tokens and jobs keep matching."""
    path = state_dir / "dev-org"
    if path.is_file():
        return uuid.UUID(path.read_text().strip())
    org = uuid.uuid4()
    path.write_text(f"{org}\n")
    return org


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """`export NAME='value'` lines, so `. path` in a shell hands them to the commands it runs
    next. Readable by the owner only (a token, a database URL); written whole, then renamed,
    so whoever waits for the file (scripts/up) never reads half of it."""
    text = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in values.items())
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    partial.replace(path)


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


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f" (its log: {log})" if log is not None else ""
            raise HeimdexError(f"the API exited with code {proc.returncode} during startup{where}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise HeimdexError(f"the API at {url} was not ready within {timeout:.0f}s")


def served(url: str) -> bool:
    """Whether the API answers `url` with anything but 404 (a page that exists)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return bool(resp.status < 400)
    except urllib.error.HTTPError as exc:
        return exc.code != 404
    except (urllib.error.URLError, OSError):
        return False


class LogTail:
    """New lines of several log files, from the offsets they had when the tail was made."""

    def __init__(self, files: dict[str, Path], *, from_start: bool = False) -> None:
        self.files = files
        self.offsets = {
            name: 0 if from_start or not path.exists() else path.stat().st_size
            for name, path in files.items()
        }
        self._partial: dict[str, str] = dict.fromkeys(files, "")

    def poll(self) -> Iterator[tuple[str, str]]:
        for name, path in self.files.items():
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets[name])
                    chunk = f.read()
            except FileNotFoundError:
                continue
            self.offsets[name] += len(chunk)
            text = self._partial[name] + chunk.decode("utf-8", errors="replace")
            *lines, self._partial[name] = text.split("\n")
            for line in lines:
                if line.strip():
                    yield name, line

    def last(self, name: str, count: int) -> list[str]:
        """The last `count` complete lines of `name` since the tail's offset."""
        path = self.files[name]
        try:
            with path.open("rb") as f:
                f.seek(self.offsets[name])
                lines = f.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if line.strip()][-count:]


def line_renderer(formatter: logging.Formatter) -> Callable[[str, str], str]:
    """How a followed line is shown: JSON as it is for a collector, re-rendered for a person."""
    if isinstance(formatter, JsonFormatter):
        return lambda _name, line: line

    def render(name: str, line: str) -> str:
        shown = render_json_line(line, formatter)
        return shown if shown != line else f"{name:<7} | {line}"

    return render


@dataclass
class DevStack:
    """The processes of the local stack; `start()` then `wait(stop)` then `stop()`."""

    settings: Settings
    state_dir: Path
    api_port: int
    verbose: bool = False
    processes: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    postgres: LocalPostgres | None = None

    def __post_init__(self) -> None:
        if not self.processes:
            self.processes = dev_processes(self.api_port)

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_files(self) -> dict[str, Path]:
        """Every log the stack writes, by process name (`dev` is this process itself)."""
        return {name: self.logs_dir / f"{name}.log" for name in (SELF, *self.processes)}

    def start(self) -> tuple[str, str]:
        ensure_port_free(self.api_port)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)  # noqa: S103 - the PostgreSQL user must traverse it
        self.logs_dir.mkdir(exist_ok=True)
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
            "HEIMDEX_LOG_LEVEL": "debug" if self.verbose else self.settings.log_level,
        }
        api_url = f"http://127.0.0.1:{self.api_port}"
        logs = self.log_files()
        for name, args in self.processes.items():
            with logs[name].open("ab") as log:
                # The child holds its own descriptor; ours can close at once.
                self.procs[name] = subprocess.Popen(
                    [sys.executable, *CLI, *args],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            logger.info("%s started", name, extra={"action": "dev.started", "proc": name})
        wait_ready(api_url, self.procs["api"], log=logs["api"])
        token = issue_token(
            self.settings.jwt_secret.get_secret_value(), org_id=dev_org(self.state_dir)
        )
        write_env_file(
            self.state_dir / "dev.env",
            {"HEIMDEX_URL": api_url, "HEIMDEX_TOKEN": token, "DATABASE_URL": env["DATABASE_URL"]},
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
        # All at once: none needs another to stop, so the stack takes one grace period, not
        # one per process.
        running = {name: proc for name, proc in self.procs.items() if proc.poll() is None}
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + 5
        for name, proc in running.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("killing %s", name, extra={"action": "dev.kill", "proc": name})
                proc.kill()
                proc.wait()
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except HeimdexError as exc:
                logger.warning(str(exc), extra={"action": "dev.pg_stop_failed"})


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def ready_block(stack: DevStack, url: str, token: str) -> str:
    """What a person needs once the stack is up, in one block (styled; click strips it off a
    terminal)."""

    def label(text: str) -> str:
        return click.style(f"  {text:<11}", bold=True)

    lines = [
        "",
        click.style(f"Heimdex is up at {url}", fg="green", bold=True)
        + f"  ({', '.join(stack.processes)}; PostgreSQL on port "
        + f"{stack.postgres.port if stack.postgres else '?'})",
        "",
        label("API") + click.style(url, fg="cyan"),
    ]
    shown = [name for name, path in PAGES.items() if served(f"{url}{path}")]
    lines += [label(name) + click.style(f"{url}{PAGES[name]}", fg="cyan") for name in shown]
    if "Dashboard" in shown:
        lines.append(
            label("")
            + "sign in with: heimdex dev-token --org "
            + f'"$(cat {_shown(stack.state_dir / "dev-org")})" --role heimdex_admin'
        )
    files = stack.log_files()
    lines += [
        label("Logs") + f"{_shown(stack.logs_dir)}/{{{','.join(files)}}}.log"
        "  (heimdex dev logs -f)",
        label("Env") + f"{_shown(stack.state_dir / 'dev.env')}  (. it in another shell)",
        "",
        f"  export HEIMDEX_URL={url}",
        f"  export HEIMDEX_TOKEN={token}",
        "",
        click.style("  Next:", bold=True) + " make demo   (walks a job through its stages), or",
        '  curl -s -X POST "$HEIMDEX_URL/jobs" -H "Authorization: Bearer $HEIMDEX_TOKEN" '
        '-H \'Content-Type: application/json\' -d \'{"type": "mock_process", "params": {}}\'',
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def follow(tail: LogTail, render: Callable[[str, str], str], stop: threading.Event) -> None:
    while True:
        for name, line in tail.poll():
            click.echo(render(name, line), err=True)
        if stop.wait(0.2):
            for name, line in tail.poll():
                click.echo(render(name, line), err=True)
            return


DEV_EPILOG = """\b
Examples:
  heimdex dev                  # start; the ready block shows the URLs and a token
  heimdex dev --follow         # the same, streaming every process's log here
  heimdex dev logs -f worker   # in another shell: follow the worker's log
"""


@click.group(invoke_without_command=True, epilog=DEV_EPILOG)
@click.option("--port", type=click.IntRange(1, 65535), help="API port (default: settings).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / ".heimdex",
    show_default=True,
    help="Where the cluster, dev org, dev.env and logs/ live.",
)
@click.option(
    "-f", "--follow", "follow_logs", is_flag=True, help="Stream the processes' logs here too."
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log at debug level, third-party lines included (uvicorn access, alembic).",
)
@click.pass_context
def dev(
    ctx: click.Context, port: int | None, state_dir: Path, follow_logs: bool, verbose: bool
) -> None:
    """Run the whole stack locally (PostgreSQL from the system binaries) until Ctrl-C.

    The processes log to files under STATE_DIR/logs/; the terminal shows one block once the
    stack is ready (URLs, a token, what to try next), and warnings.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    if settings.env is Environment.PROD:
        raise HeimdexError("heimdex dev refuses to run with HEIMDEX_ENV=prod")
    stack = DevStack(settings, state_dir.resolve(), port or settings.api_port, verbose=verbose)
    level = "debug" if verbose else settings.log_level
    files = stack.log_files()
    tail = LogTail(files)
    configure_logging(
        SELF,
        **{**settings.log_options, "level": level},
        # The file has everything; the terminal only what needs a person, unless asked. With
        # --follow the dev log is streamed with the others: nothing directly, or twice.
        stream_level=logging.CRITICAL + 1
        if follow_logs
        else (level if verbose else logging.WARNING),
        file=files[SELF],
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tail_stop = threading.Event()
    follower = None
    if follow_logs:
        render = line_renderer(
            make_formatter(settings.log_format, "", sys.stderr, color=not settings.no_color)
        )
        follower = threading.Thread(target=follow, args=(tail, render, tail_stop), daemon=True)
        follower.start()
    click.echo(
        f"starting {', '.join(['PostgreSQL', *stack.processes])} (logs in "
        f"{_shown(stack.logs_dir)}) ..."
    )
    dead = None
    try:
        url, token = stack.start()
        click.echo(ready_block(stack, url, token), color=False if settings.no_color else None)
        dead = stack.wait(stop)
    finally:
        stack.stop()
        tail_stop.set()
        if follower is not None:
            follower.join(timeout=5)
    if dead is not None:
        if not follow_logs:
            render = line_renderer(
                make_formatter(settings.log_format, "", sys.stderr, color=not settings.no_color)
            )
            for line in tail.last(dead, 20):
                click.echo(render(dead, line), err=True)
        raise HeimdexError(
            f"{dead} exited unexpectedly (code {stack.procs[dead].returncode}); the stack was "
            f"stopped (its log: {files[dead]})"
        )


@dev.command(
    epilog="""\b
Examples:
  heimdex dev logs -f            # follow the api, worker and dev logs as they grow
  heimdex dev logs -n 50 worker  # the worker's last 50 lines
"""
)
@click.argument("names", nargs=-1)
@click.option("-f", "--follow", "follow_logs", is_flag=True, help="Keep streaming until Ctrl-C.")
@click.option(
    "-n", "--lines", default=20, show_default=True, help="Lines of each log to show first."
)
@click.pass_context
def logs(ctx: click.Context, names: tuple[str, ...], follow_logs: bool, lines: int) -> None:
    """Show the logs of `heimdex dev` (NAMES: dev, api, worker; default all)."""
    settings = load_settings()
    state_dir = Path(ctx.parent.params["state_dir"] if ctx.parent else REPO_ROOT / ".heimdex")
    files = {path.stem: path for path in sorted((state_dir.resolve() / "logs").glob("*.log"))}
    if not files:
        raise HeimdexError(f"no logs under {state_dir / 'logs'}: start the stack with heimdex dev")
    unknown = sorted(set(names) - set(files))
    if unknown:
        raise HeimdexError(f"no log named {', '.join(unknown)}; there are: {', '.join(files)}")
    if names:
        files = {name: files[name] for name in names}
    render = line_renderer(
        make_formatter(settings.log_format, "", sys.stdout, color=not settings.no_color)
    )
    tail = LogTail(files, from_start=True)
    for name in files:
        for line in tail.last(name, lines):
            click.echo(render(name, line))
    if not follow_logs:
        return
    tail = LogTail(files)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while True:
        for name, line in tail.poll():
            click.echo(render(name, line))
        if stop.wait(0.2):
            return
