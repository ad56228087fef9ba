"""The deadline watch: a thread that stops attempts at their execution timeout.

At an attempt's deadline it marks the attempt timed out (the handler's context raises
`JobTimeout` at its next stage or check) and terminates the child processes started through
the context (SIGTERM to each one's process group). After the grace period it kills what is left
(SIGKILL), and if the handler still has not returned (a second after the kill, when it had
children to wait on), the attempt is stuck: `on_stuck` ends it (TIMEOUT, retried by the job's
policy) and gives its slot back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from heimdex_worker.held import Held, HeldJobs

logger = logging.getLogger(__name__)

# Most time between two looks when nothing is due sooner (a new deadline also wakes it).
MAX_WAIT_SECONDS = 1.0
# After its children were killed, how long a handler gets to return (it is usually waiting on
# them) before it is declared stuck.
AFTER_KILL_SECONDS = 1.0


def signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    """Send `sig` to the process group `proc` leads (children run in a session of their own),
    so what it started goes too; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class DeadlineWatch:
    """Watches the deadlines of the attempts `held`, until `finish` is set."""

    def __init__(
        self,
        held: HeldJobs,
        *,
        grace_seconds: float,
        on_stuck: Callable[[Held], None],
        finish: threading.Event,
    ) -> None:
        self.held = held
        self.grace_seconds = grace_seconds
        self.on_stuck = on_stuck
        self.finish = finish
        self._changed = threading.Event()

    def watch(self, held: Held, timeout_seconds: float) -> None:
        """Start the clock of an attempt that begins now."""
        held.deadline = time.monotonic() + timeout_seconds
        self._changed.set()

    def run(self) -> None:
        while not self.finish.is_set():
            wait = self.look(time.monotonic())
            self._changed.wait(wait)
            self._changed.clear()

    def look(self, now: float) -> float:
        """Act on every deadline passed; the time until the next one."""
        wait = MAX_WAIT_SECONDS
        for held in self.held.all():
            if held.deadline is None or held.ended:
                continue
            if not held.timed_out and now >= held.deadline:
                self._time_out(held)
            if held.timed_out:
                kill_at = held.deadline + self.grace_seconds
                if now >= kill_at and not held.killed:
                    self._kill(held)
                stuck_at = kill_at + (AFTER_KILL_SECONDS if held.children else 0.0)
                if now >= stuck_at:
                    if held.end("watch"):
                        self.on_stuck(held)
                    continue
                wait = min(wait, (kill_at if not held.killed else stuck_at) - now)
            else:
                wait = min(wait, held.deadline - now)
        return max(wait, 0.01)

    @staticmethod
    def _time_out(held: Held) -> None:
        held.timed_out = True
        logger.info(
            "attempt timed out; stopping it",
            extra={"action": "job.timeout", "job_id": str(held.job.id), "type": held.job.type},
        )
        for proc in list(held.children):
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)

    @staticmethod
    def _kill(held: Held) -> None:
        held.killed = True
        for proc in list(held.children):
            signal_group(proc, signal.SIGKILL)
