"""hadolint on the Dockerfile, ShellCheck on the scripts the image and the proof run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, DOCKERFILE, REPO, dev_tool

SCRIPTS = [DEPLOY / "entrypoint.sh", REPO / "scripts" / "test-containers.sh"]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # Any finding fails, down to `info`: the Dockerfile is small enough to keep spotless.
    return subprocess.run(
        [dev_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dev_tool("shellcheck"), "--severity", "style", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_dockerfile_passes_hadolint() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_rejects_a_dockerfile_violation(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nRUN pip install requests\n")
    done = hadolint(bad)
    assert done.returncode != 0
    assert "DL3013" in done.stdout  # unpinned pip install


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    done = shellcheck(script)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_rejects_a_script_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    done = shellcheck(bad)
    assert done.returncode != 0
    assert "SC2086" in done.stdout  # unquoted expansion
