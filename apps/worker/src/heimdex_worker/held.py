"""The jobs a worker process holds: claimed, their outcome not written yet."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from heimdex.ledger import service
from heimdex.ledger.repository import ClaimedJob, Outcome


@dataclass
class Held:
    """A job this process claimed and has not written the outcome of yet."""

    job: ClaimedJob
    claimed_at: float = field(default_factory=time.monotonic)
    # Set by the keeper when a heartbeat finds the lease gone (a plain flag: an Event per job
    # costs a lock and a condition, and nothing waits on it).
    lost: bool = False
    stage: str | None = None
    # Under HeldJobs' lock: a runner took it to run it; the keeper recorded it as waiting
    # unstarted (`prefetched`), so its runner records the start first.
    taken: bool = False
    prefetched: bool = False
    # The attempt's deadline (monotonic), if its type or submission has a timeout; set by the
    # deadline watch once passed, read by the handler's context at each stage and check.
    deadline: float | None = None
    timed_out: bool = False
    killed: bool = False
    children: list[subprocess.Popen[Any]] = field(default_factory=list)
    # Who ended the attempt first: its runner (the handler returned) or the deadline watch (the
    # handler did not stop within the grace period: stuck). Whoever comes second does nothing.
    _ended: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def end(self, by: str) -> bool:
        """Claim the attempt's end for `by` ("runner" or "watch"); False if the other won."""
        with self._lock:
            if self._ended is not None:
                return False
            self._ended = by
            return True

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def token(self) -> uuid.UUID:
        token: uuid.UUID = self.job.lease_token
        return token


Done = tuple[Held, "Outcome | service.Failure | None", str]
"""An ended attempt: the job, its outcome (None: the lease was lost) and how it ended."""


class HeldJobs:
    """What the runners hold, shared with the outcome writer (which forgets what it wrote) and
    the keeper (which renews their leases)."""

    def __init__(self) -> None:
        self._held: dict[uuid.UUID, Held] = {}
        self._lock = threading.Lock()
        # Held by the keeper while its statement recording prefetched jobs is in flight.
        self.recording = threading.Lock()

    def hold(self, jobs: Iterable[ClaimedJob]) -> list[Held]:
        """Hold what one claim took; the first job is its claimer's, taken at once."""
        with self._lock:
            fresh = [Held(job) for job in jobs]
            if fresh:
                fresh[0].taken = True
            for h in fresh:
                self._held[h.job.id] = h
        return fresh

    def take(self, held: Held) -> bool:
        """A runner takes `held` to run it now. True when the keeper recorded it as not
        started: its runner must record the start before the handler runs. Returns only once
        the keeper's statement about it has ended, so that record comes after it."""
        with self._lock:
            held.taken = True
            prefetched = held.prefetched
        if prefetched:
            with self.recording:
                pass
        return prefetched

    def mark_prefetched(self, older_than: float) -> list[Held]:
        """The jobs no runner took, claimed `older_than` seconds ago or more and not marked
        yet, now marked as prefetched. The caller holds `recording` until it has recorded them
        (or put them back with `unmark`)."""
        now = time.monotonic()
        with self._lock:
            waiting = [
                h
                for h in self._held.values()
                if not (h.taken or h.prefetched) and now - h.claimed_at >= older_than
            ]
            for h in waiting:
                h.prefetched = True
        return waiting

    def unmark(self, jobs: Iterable[Held]) -> None:
        """Recording them failed: those no runner took yet count as started again."""
        with self._lock:
            for h in jobs:
                if not h.taken:
                    h.prefetched = False

    def forget(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def all(self) -> list[Held]:
        with self._lock:
            return list(self._held.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
