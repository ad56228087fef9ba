"""pytest plugin (`-p previous_release_schema`) for the previous release's own test suite: its
tests run against this checkout's schema as a deploy leaves it before the new code starts.

Loaded by scripts/previous-release into the release's pytest, in the release's environment. The
release's tests/conftest.py builds one template database per session (`head_template`, Alembic
upgrade head of the release's own history) and clones it per test. This plugin swaps that
fixture for one that builds the template the way a deploy does: the release's
`heimdex db upgrade` (the schema the running release was deployed on), then this checkout's
`heimdex db upgrade --phase expand` (the CLI named by HEIMDEX_HEAD_CLI), which applies the new
expand revisions and stops before the first revision of another phase. Everything else (the
cluster, the clones, the API and worker processes) stays the release's own.

Nothing here imports the release's code: it reaches the release's conftest through pytest's
plugin registration, and both migrations run as processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HEAD_CLI_ENV = "HEIMDEX_HEAD_CLI"
HEAD_INI_ENV = "HEIMDEX_HEAD_ALEMBIC_INI"  # another history's expand revisions (the step's tests)
# A file the lines of `_report` are appended to, for a run with pytest-xdist workers (whose
# terminal summary nobody sees); without it they end the terminal summary.
REPORT_ENV = "HEIMDEX_PREVIOUS_RELEASE_REPORT"
_report: list[str] = []


def _migrate(argv: list[str], url: str, what: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        pytest.exit(f"{what} failed (exit {done.returncode}):\n{output}", returncode=3)
    # stdout says what was applied and where it stopped; stderr is the per-step log.
    lines = [f"{what}: {line}" for line in done.stdout.strip().splitlines()]
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a", encoding="utf-8") as out:
            out.writelines(f"{line}\n" for line in lines)
    else:
        _report.extend(lines)


def _expand_template(release_conftest: ModuleType) -> Any:
    template_name: str = release_conftest.TEMPLATE

    @pytest.fixture(scope="session", name="head_template")
    def head_template(create_database: Any) -> str:
        head_cli = os.environ.get(HEAD_CLI_ENV)
        if not head_cli:
            pytest.exit(f"{HEAD_CLI_ENV} is not set: the path of this checkout's heimdex CLI")
        url = create_database(name=template_name).render_as_string(hide_password=False)
        release_cli = str(Path(sys.executable).with_name("heimdex"))
        _migrate([release_cli, "db", "upgrade", "head"], url, "release")
        head_ini = os.environ.get(HEAD_INI_ENV)
        config = ["-c", head_ini] if head_ini else []
        _migrate([head_cli, "db", "upgrade", *config, "--phase", "expand"], url, "head (expand)")
        return template_name

    return head_template


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    """Swap the release conftest's `head_template` before pytest reads its fixtures.

    A conftest's fixture would win over a plugin's of the same name, so the conftest's own
    attribute is replaced; pytest parses a conftest's fixtures after this hook has seen it.
    """
    path = str(getattr(plugin, "__file__", None) or "")
    if not isinstance(plugin, ModuleType) or Path(path).parts[-2:] != ("tests", "conftest.py"):
        return
    if not hasattr(plugin, "head_template") or not hasattr(plugin, "TEMPLATE"):
        pytest.exit(f"{path} has no head_template fixture and TEMPLATE name to replace")
    plugin.head_template = _expand_template(plugin)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _report:
        terminalreporter.section("schema under test")
        for line in _report:
            terminalreporter.write_line(line)
