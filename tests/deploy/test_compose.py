"""The compose stack as the playbook and the container test script expect it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    COMPOSE,
    COMPOSE_DEV,
    DEPLOY,
    DOCKERFILE,
    ENV_EXAMPLE,
    HEIMDEX_SERVICES,
    REPO,
    load_yaml,
)

# ${NAME}, ${NAME:-default} or ${NAME-default}; `$$` is compose's escape for a literal `$`.
INTERPOLATION = re.compile(
    r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)?(?P<default>[^}]*)\}"
)


def interpolations() -> list[re.Match[str]]:
    return list(INTERPOLATION.finditer(COMPOSE.read_text()))


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_the_stack_has_its_four_services_and_no_broker(services: dict[str, Any]) -> None:
    assert set(services) == {"pg", *HEIMDEX_SERVICES}


def test_base_images_are_overridable_with_upstream_defaults(services: dict[str, Any]) -> None:
    assert services["pg"]["image"] == "${POSTGRES_IMAGE:-postgres:17-alpine}"
    build = services["api"]["build"]
    assert build["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim}"
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_heimdex_process_runs_the_one_image(services: dict[str, Any]) -> None:
    images = {services[name]["image"] for name in HEIMDEX_SERVICES}
    assert len(images) == 1
    # Only api builds: podman-compose would otherwise run four identical builds at once.
    assert [name for name in services if "build" in services[name]] == ["api"]


def test_api_publishes_8000_and_is_health_checked_on_readyz(services: dict[str, Any]) -> None:
    api = services["api"]
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert "--port" in api["command"] and "8000" in api["command"]
    assert "0.0.0.0" in api["command"]  # noqa: S104 - reachable through the published port
    assert "/readyz" in " ".join(api["healthcheck"]["test"])


def test_pg_is_health_checked(services: dict[str, Any]) -> None:
    assert "pg_isready" in " ".join(services["pg"]["healthcheck"]["test"])


def test_migrate_is_a_one_shot_heimdex_db_upgrade_that_waits_for_pg(
    services: dict[str, Any],
) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["heimdex", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["entrypoint"] == ["/app/deploy/entrypoint.sh"]
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_processes_start_after_a_successful_migration(services: dict[str, Any], name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert set(depends) == {"migrate", "pg"}
    assert depends["pg"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", HEIMDEX_SERVICES)
def test_processes_reach_pg_by_service_name(services: dict[str, Any], name: str) -> None:
    env = services[name]["environment"]
    assert env["PGHOST"] == "pg"
    assert "REDIS_URL" not in env
    for required in ("PGUSER", "PGPASSWORD", "PGDATABASE", "HEIMDEX_ENV", "HEIMDEX_JWT_SECRET"):
        assert required in env
    assert services[name]["env_file"] == [{"path": ".env", "required": False}]


def test_the_stack_starts_without_any_variable_set() -> None:
    missing = [m.group(0) for m in interpolations() if m.group("op") is None]
    assert missing == [], f"interpolations without a default: {missing}"


def test_env_example_documents_every_variable_with_the_compose_default() -> None:
    documented = env_example()
    for match in interpolations():
        name = match.group("name")
        assert name in documented, f"{name} is read by the compose file but not in .env.example"
        assert documented[name] == match.group("default"), (
            f"{name}: .env.example says {documented[name]!r}, "
            f"the compose default is {match.group('default')!r}"
        )


def test_the_local_jwt_default_is_the_placeholder_the_settings_refuse_outside_local() -> None:
    from heimdex.settings import PLACEHOLDER_JWT_SECRET

    assert env_example()["HEIMDEX_JWT_SECRET"] == PLACEHOLDER_JWT_SECRET
    assert env_example()["HEIMDEX_ENV"] == "local"


def test_dev_override_mounts_versions_and_artifacts_from_the_checkout() -> None:
    volumes = load_yaml(COMPOSE_DEV)["services"]["api"]["volumes"]
    mounts = {
        target: (DEPLOY / source).resolve() for source, target in (v.split(":") for v in volumes)
    }
    assert mounts == {
        "/app/packages/common/alembic/versions": REPO / "packages/common/alembic/versions",
        "/app/supabase/migrations": REPO / "supabase/migrations",
    }


def workspace_members() -> list[str]:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    members = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members += [
            p.parent.relative_to(REPO).as_posix()
            for p in sorted(REPO.glob(f"{pattern}/pyproject.toml"))
        ]
    return members


def test_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    deps = next(i for i, line in enumerate(lines) if "--no-install-workspace" in line)
    source = lines.index("COPY . .")
    workspace = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("RUN uv sync --frozen --no-dev") and i > source
    )
    assert deps < source < workspace
    copied = set(lines[:deps])
    assert "COPY pyproject.toml uv.lock ./" in copied
    for member in workspace_members():
        assert f"COPY {member}/pyproject.toml {member}/" in copied, (
            f"workspace member {member} is not in the dependency layer of deploy/Dockerfile"
        )


def test_the_image_leaves_the_dev_tooling_out() -> None:
    # `uv sync --no-dev` installs the root's dependencies: heimdex-dev must come only with the
    # dev group, and nothing the image runs may import it (import-linter, pyproject.toml).
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = root["project"]["dependencies"]
    assert not [d for d in runtime if d.startswith("heimdex-dev")]
    assert "heimdex-dev" in root["dependency-groups"]["dev"]
    assert "--no-dev" in DOCKERFILE.read_text()


def test_dockerfile_runs_as_a_non_root_appuser_from_app() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "FROM ${PYTHON_IMAGE}" in text
    assert "WORKDIR /app" in text
    assert 'useradd --uid "${APP_UID}"' in text and "appuser" in text
    users = re.findall(r"^USER (.+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")


def compose_tool_env() -> dict[str, str]:
    """The environment minus every variable the compose file reads: the defaults are checked."""
    names = {m.group("name") for m in interpolations()} | {"COMPOSE_PROJECT_NAME"}
    return {k: v for k, v in os.environ.items() if k not in names}


@pytest.fixture
def podman_compose() -> str:
    found = shutil.which("podman-compose")
    if found is None:
        pytest.skip("podman-compose is not installed (../shared/tools/container-lab setup)")
    return found


def run_config(tool: str, *files: Path) -> dict[str, Any]:
    args = [tool]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        env=compose_tool_env(),
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert isinstance(rendered, dict)
    return rendered


def as_dict(entries: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Compose allows both `KEY: value` and `- KEY=value`; tools render either."""
    if isinstance(entries, dict):
        return entries
    return dict(entry.split("=", 1) for entry in entries)


@pytest.mark.slow  # podman-compose as a process
def test_podman_compose_accepts_the_file_with_its_defaults(podman_compose: str) -> None:
    services = run_config(podman_compose, COMPOSE)["services"]
    assert services["pg"]["image"] == "postgres:17-alpine"
    assert as_dict(services["api"]["build"]["args"])["PYTHON_IMAGE"] == "python:3.11-slim"
    assert as_dict(services["worker"]["environment"])["HEIMDEX_ENV"] == "local"


@pytest.mark.slow  # podman-compose as a process
def test_podman_compose_merges_the_dev_override(podman_compose: str) -> None:
    rendered = run_config(podman_compose, COMPOSE, COMPOSE_DEV)
    targets = {str(v).split(":")[1] for v in rendered["services"]["api"]["volumes"]}
    assert targets == {"/app/packages/common/alembic/versions", "/app/supabase/migrations"}
    assert "volumes" not in rendered["services"]["worker"]
