"""What the dashboard's Pools page shows, put together from the ledger: per queue (a worker
pool) and per org, jobs running against their cap, each org's share of a queue's running time
over the last hour against its weight's share, the pauses, and the oldest waiting job of each
queue and org with why it waits (`why`)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection

from heimdex.ledger.repository import limits as limit_rows
from heimdex.ledger.repository import pools as rows
from heimdex.ledger.repository.limits import Limit, Pause

# A queue none of whose jobs started for this long, and with none running, has no worker
# claiming from it (there is no registry of workers: their claims are what shows them).
LATELY = timedelta(minutes=10)
WINDOW_SECONDS = 3600
ORGS_SHOWN = 50

Scope = tuple[uuid.UUID | None, str | None]


@dataclass(frozen=True)
class Cap:
    max_running: int
    used: int  # jobs placed or running counted against it

    @property
    def full(self) -> bool:
        return self.used >= self.max_running


@dataclass(frozen=True)
class Waiter:
    """The oldest waiting job of a queue or org, and why it waits: `reason` is one of
    "paused", "cap", "no_worker", "behind"; `why` says it in words."""

    job: rows.Waiting
    reason: str
    why: str


@dataclass
class OrgInQueue:
    org_id: uuid.UUID
    running: int = 0
    waiting: int = 0
    cap: Cap | None = None
    weight: int = 1
    seconds: float = 0.0
    share: float = 0.0  # of the queue's running time in the window
    weight_share: float = 0.0  # its weight over the weights of the orgs busy in the queue


@dataclass
class Pool:
    queue: str
    running: int = 0
    waiting: int = 0
    cap: Cap | None = None
    last_start: datetime | None = None
    paused: bool = False
    seconds: float = 0.0
    orgs: list[OrgInQueue] = field(default_factory=list)  # the busiest ORGS_SHOWN
    more_orgs: int = 0
    oldest: Waiter | None = None


@dataclass
class Org:
    org_id: uuid.UUID
    running: int = 0
    waiting: int = 0
    cap: Cap | None = None
    weight: int = 1
    paused: bool = False
    oldest: Waiter | None = None


@dataclass(frozen=True)
class PoolsView:
    pools: list[Pool]
    orgs: list[Org]
    more_orgs: int  # orgs left out of `orgs` (the busiest ORGS_SHOWN are shown)
    pauses: list[Pause]
    since: datetime
    until: datetime
    cut: bool  # the window was shortened to bound the read (see `rows.running_time`)


def _cap(limit: Limit | None) -> Cap | None:
    if limit is None or limit.max_running is None:
        return None
    return Cap(limit.max_running, limit.used)


def why(
    job: rows.Waiting,
    *,
    pauses: Mapping[tuple[str, str], Pause],
    caps: Mapping[Scope, Cap],
    pool: Pool,
    now: datetime,
) -> Waiter:
    """Why `job` waits, the first that holds of: a pause of its queue, type or org; a full cap
    of its org in its queue, its org, or its queue; no worker claiming from its queue lately;
    else other jobs ahead of it in its queue."""
    for kind, value in (("queue", job.queue), ("type", job.type), ("org", str(job.org_id))):
        p = pauses.get((kind, value))
        if p is not None:
            return Waiter(job, "paused", f"{kind} {value} is paused by {p.actor}: {p.reason}")
    scopes: Sequence[tuple[Scope, str]] = (
        ((job.org_id, job.queue), f"its org's cap in queue {job.queue}"),
        ((job.org_id, None), "its org's cap"),
        ((None, job.queue), f"the cap of queue {job.queue}"),
    )
    for scope, name in scopes if not job.placed else ():  # a placed job has its slot
        cap = caps.get(scope)
        if cap is not None and cap.full:
            return Waiter(job, "cap", f"at {name}: {cap.used} of {cap.max_running} slots taken")
    if pool.running == 0 and (pool.last_start is None or now - pool.last_start > LATELY):
        minutes = int(LATELY.total_seconds() // 60)
        return Waiter(
            job,
            "no_worker",
            f"no worker for queue {job.queue}: none of its jobs started in the last {minutes} min",
        )
    ahead = max(0, pool.waiting - 1)
    return Waiter(
        job,
        "behind",
        f"behind others: {pool.running} running and {ahead} more waiting in queue {job.queue}",
    )


class _Tally:
    """The pools, orgs and org-in-queue cells met in the rows, each made on first sight."""

    def __init__(self, limits: Sequence[Limit], paused: Mapping[tuple[str, str], Pause]) -> None:
        self.caps: dict[Scope, Cap] = {}
        self.weights: dict[uuid.UUID, int] = {}
        for limit in limits:
            cap = _cap(limit)
            if cap is not None:
                self.caps[(limit.org_id, limit.queue)] = cap
            if limit.org_id is not None and limit.queue is None:
                self.weights[limit.org_id] = limit.weight
        self.paused = paused
        self.pools: dict[str, Pool] = {}
        self.orgs: dict[uuid.UUID, Org] = {}
        self.cells: dict[str, dict[uuid.UUID, OrgInQueue]] = defaultdict(dict)

    def pool(self, queue: str) -> Pool:
        if queue not in self.pools:
            self.pools[queue] = Pool(
                queue, cap=self.caps.get((None, queue)), paused=("queue", queue) in self.paused
            )
        return self.pools[queue]

    def org(self, org_id: uuid.UUID) -> Org:
        if org_id not in self.orgs:
            self.orgs[org_id] = Org(
                org_id,
                cap=self.caps.get((org_id, None)),
                weight=self.weights.get(org_id, 1),
                paused=("org", str(org_id)) in self.paused,
            )
        return self.orgs[org_id]

    def cell(self, queue: str, org_id: uuid.UUID) -> OrgInQueue:
        self.pool(queue)
        self.org(org_id)
        cells = self.cells[queue]
        if org_id not in cells:
            cells[org_id] = OrgInQueue(
                org_id, cap=self.caps.get((org_id, queue)), weight=self.weights.get(org_id, 1)
            )
        return cells[org_id]

    def shares(self) -> None:
        """Each org's share of its queue's running time, and its weight's share among the
        orgs busy in the queue (running time in the window, running or waiting now): an idle
        org's weight is not counted, its share goes to the others."""
        for queue, cells in self.cells.items():
            pool = self.pools[queue]
            busy = {o for o, c in cells.items() if c.seconds > 0 or c.running or c.waiting}
            total = sum(cells[o].weight for o in busy)
            for org_id, c in cells.items():
                c.share = c.seconds / pool.seconds if pool.seconds else 0.0
                c.weight_share = c.weight / total if org_id in busy else 0.0
            ranked = sorted(cells.values(), key=lambda c: (-c.running, -c.waiting, str(c.org_id)))
            pool.orgs, pool.more_orgs = ranked[:ORGS_SHOWN], max(0, len(ranked) - ORGS_SHOWN)


def view(conn: Connection, *, seconds: int = WINDOW_SECONDS) -> PoolsView:
    """The Pools page's figures, read in the caller's connection (see `repository.pools` for
    what each statement reads); in one snapshot (REPEATABLE READ) they agree with each other."""
    limits = limit_rows.list_limits(conn)
    pauses = limit_rows.list_pauses(conn)
    loads = rows.loads(conn)
    ran = rows.running_time(conn, seconds=seconds)
    by_queue = rows.oldest_waiting(conn, by="queue")
    by_org = rows.oldest_waiting(conn, by="org")

    paused = {(p.kind, p.value): p for p in pauses}
    t = _Tally(limits, paused)
    for load in loads:
        p, o, c = t.pool(load.queue), t.org(load.org_id), t.cell(load.queue, load.org_id)
        p.running += load.running
        p.waiting += load.waiting
        o.running += load.running
        o.waiting += load.waiting
        c.running, c.waiting = load.running, load.waiting
    for r in ran.rows:
        p, c = t.pool(r.queue), t.cell(r.queue, r.org_id)
        p.seconds += r.seconds
        c.seconds += r.seconds
        if r.last_start is not None and (p.last_start is None or r.last_start > p.last_start):
            p.last_start = r.last_start
    for limit in limits:
        if limit.org_id is not None and limit.queue is not None:
            t.cell(limit.queue, limit.org_id)
        elif limit.queue is not None:
            t.pool(limit.queue)
        elif limit.org_id is not None:
            t.org(limit.org_id)
    for pause in pauses:
        if pause.kind == "queue":
            t.pool(pause.value)
    t.shares()

    def waiter(job: rows.Waiting) -> Waiter:
        # t.pool: read in autocommit, a queue may be new since `loads`
        return why(job, pauses=paused, caps=t.caps, pool=t.pool(job.queue), now=ran.until)

    for job in by_queue:
        t.pool(job.queue).oldest = waiter(job)
    for job in by_org:
        t.org(job.org_id).oldest = waiter(job)

    ranked = sorted(t.orgs.values(), key=lambda o: (-o.running, -o.waiting, str(o.org_id)))
    return PoolsView(
        pools=sorted(t.pools.values(), key=lambda p: p.queue),
        orgs=ranked[:ORGS_SHOWN],
        more_orgs=max(0, len(ranked) - ORGS_SHOWN),
        pauses=pauses,
        since=ran.since,
        until=ran.until,
        cut=ran.cut,
    )
