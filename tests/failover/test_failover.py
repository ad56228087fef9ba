"""bench/failover.py in small: one switchover and one kill of the primary of a real
pg_auto_failover formation, with the API, two workers and a steady client. About three minutes,
so it runs only when asked for: `uv run pytest -n 0 -m failover tests/failover`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.failover

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "failover.py"


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("failover_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_switchover_and_a_kill_of_the_primary_lose_nothing() -> None:
    trials, final = load_harness().run(1, quiet=True)
    assert [t.kind for t in trials] == ["switchover", "kill"]
    for trial in trials:
        assert trial.primary_after != trial.primary_before, trial.row()
        assert trial.accepted > 0, trial.row()
        assert trial.missing == 0, trial.row()
        assert trial.run_twice == trial.run_twice_after_expiry, trial.row()
    # Every accepted job ran to one success, after both failovers.
    assert final["missing"] == 0, final
    assert final["not_succeeded"] == 0, final
    assert final["succeeded_twice"] == 0, final
    assert final["run_twice_without_expiry"] == 0, final
