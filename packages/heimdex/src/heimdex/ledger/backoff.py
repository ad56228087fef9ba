"""The retry schedule: how long a failed attempt waits before the job is delivered again."""

from __future__ import annotations

from heimdex.models import BackoffPolicy


def retry_delay(policy: BackoffPolicy, failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1 for the first failure).

    `none` retries at once, `fixed` waits `base`, `exp` waits `base * 2**(failures-1)`; both
    are capped at `cap`. Deterministic on purpose: tests and operators can predict it.
    """
    if failures < 1:
        raise ValueError("failures counts failed attempts and starts at 1")
    if policy is BackoffPolicy.NONE:
        return 0.0
    if policy is BackoffPolicy.FIXED:
        return min(base, cap)
    return float(min(cap, base * 2 ** min(failures - 1, 62)))
