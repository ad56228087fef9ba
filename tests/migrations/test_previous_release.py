"""scripts/previous-release: finds the previous release, runs its tests on the schema after
`heimdex db upgrade --phase expand`, and fails when an expand revision breaks that release."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, HistoryCopy, clean_env, revisions_of

pytestmark = pytest.mark.slow  # the previous release's pytest as a process

SCRIPT = REPO / "scripts" / "previous-release"
RECORD = REPO / ".ci" / "previous-release"
RELEASE_DIR_ENV = "HEIMDEX_PREVIOUS_RELEASE_DIR"
# One test of the release that writes a job through its API and reads it back.
SUBMIT = "tests/api/test_jobs_api.py::test_submit_writes_the_job_and_its_event_and_wakes_workers"


@pytest.fixture
def release_dir() -> str:
    """An installed checkout of the previous release (.ci/run sets it)."""
    given = os.environ.get(RELEASE_DIR_ENV)
    if not given:
        pytest.skip(
            f"{RELEASE_DIR_ENV} is not set: export {RELEASE_DIR_ENV}="
            "$(scripts/previous-release --install)"
        )
    return given


def _after_the_release(history: HistoryCopy, release_dir: str) -> None:
    """The copy cut back to the release's own head, so the test revision is the only one the
    expand applies (whatever the repository added after the release, of whatever phase)."""
    release_ini = Path(release_dir) / "packages" / "common" / "alembic.ini"
    history.truncate_after(revisions_of(release_ini)[-1])


def _step(
    history: HistoryCopy, release_dir: str, *pytest_args: str
) -> subprocess.CompletedProcess[str]:
    env = clean_env(HEIMDEX_HEAD_ALEMBIC_INI=str(history.ini), **{RELEASE_DIR_ENV: release_dir})
    return subprocess.run(
        [str(SCRIPT), "-n", "0", "-q", *pytest_args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )


def _add_expand_column(history: HistoryCopy, release_dir: str, rev: str, column: str) -> None:
    _after_the_release(history, release_dir)
    history.add_revision(
        rev,
        history.head,
        f"""
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.add_column("job", {column})
        """,
        header='phase = "expand"',
    )


def test_an_additive_expand_revision_keeps_the_previous_release_passing(
    history: HistoryCopy, release_dir: str
) -> None:
    _add_expand_column(history, release_dir, "prevok000001", 'sa.Column("region", sa.Text())')

    step = _step(history, release_dir, SUBMIT)

    assert step.returncode == 0, step.stdout + step.stderr
    assert "head (expand): prevok000001 applied; now at prevok000001" in step.stdout
    assert "1 passed" in step.stdout


def test_an_expand_revision_that_breaks_the_previous_release_fails_the_step(
    history: HistoryCopy, release_dir: str
) -> None:
    # NOT NULL without a default: the previous release's INSERT does not write it.
    _add_expand_column(
        history, release_dir, "prevbad00001", 'sa.Column("region", sa.Text(), nullable=False)'
    )

    step = _step(history, release_dir, SUBMIT)

    assert step.returncode == 1, step.stdout + step.stderr
    assert "head (expand): prevbad00001 applied; now at prevbad00001" in step.stdout
    # Failed, then failed again on the step's one retry of the failed tests.
    assert "the failed tests once more" in step.stdout
    assert step.stdout.count(f"FAILED {SUBMIT}") == 2, step.stdout
    assert "1 failed" in step.stdout


def _clone(tmp_path: Path, *flags: str) -> Path:
    """A clone as CI makes one, carrying this checkout's script and record."""
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", *flags, f"file://{REPO}", str(clone)],
        check=True,
        capture_output=True,
    )
    shutil.copy(SCRIPT, clone / "scripts" / "previous-release")
    shutil.copy(RECORD, clone / ".ci" / "previous-release")
    return clone


def _which(clone: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(clone / "scripts" / "previous-release"), "--which"],
        capture_output=True,
        text=True,
        check=False,
        cwd=clone,
        env=clean_env(),
    )


def test_a_shallow_clone_without_tags_fetches_them_from_origin(tmp_path: Path) -> None:
    clone = _clone(tmp_path, "--depth", "1", "--no-tags")
    tag, sha = RECORD.read_text().split("\n", 1)[0].split()

    found = _which(clone)

    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [tag, sha]


def test_no_release_to_find_is_one_line_and_a_failure(tmp_path: Path) -> None:
    clone = _clone(tmp_path, "--depth", "1", "--no-tags")
    subprocess.run(["git", "remote", "remove", "origin"], cwd=clone, check=True)

    found = _which(clone)

    assert found.returncode == 1
    assert found.stdout == ""
    assert found.stderr.startswith("previous-release: no previous release: ")
    assert found.stderr.count("\n") == 1
