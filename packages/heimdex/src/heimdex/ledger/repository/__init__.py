"""Every statement on `job` and `job_event`, in a module per caller: `submit` (the submit path),
`worker` (claim, outcomes, heartbeat, stages), `operators` (reads by id and filter, cancels,
bulk actions, failure groups), `stats` (queue gauges, dashboard figures); `rows` is what they
share. Functions take the caller's connection and never commit: the caller decides what one
transaction is (a single statement in autocommit is one).

The hot paths (submit, claim, outcome, heartbeat) are one statement each, batched over arrays
(`unnest`), with the event rows written by the same statement, so a job's row and its audit log
can never disagree and a batch costs one round trip.

Placeholders: `:name` in statements run through SQLAlchemy (`text()`), `%(name)s` in those run
on the psycopg driver (`rows.driver_rows`: submit, claim, outcomes). Statement text varies only
by our own constants and integers, written in with f-strings, never by input.
"""

from heimdex.ledger.repository import limits, scopes
from heimdex.ledger.repository.operators import (
    ERROR_FINGERPRINT_SQL,
    FailureGroup,
    JobFilter,
    cancel_queued,
    count_eligible,
    failure_groups,
    get_job,
    list_events,
    list_jobs,
    list_jobs_ops,
    list_jobs_query,
    operate_batch,
    request_cancel,
)
from heimdex.ledger.repository.rows import (
    EVENT,
    IDEMPOTENCY_INDEX,
    JOB,
    NOTIFY_CHANNEL,
    JobRecord,
    JobRow,
    notify,
)
from heimdex.ledger.repository.stats import (
    Counts,
    Minute,
    QueueStats,
    counts,
    oldest_due,
    queue_stats,
    throughput,
)
from heimdex.ledger.repository.submit import NewJob, by_keys, insert_jobs
from heimdex.ledger.repository.worker import (
    CLAIMED_COLUMNS,
    PLACE_BATCH,
    Claim,
    ClaimedJob,
    Outcome,
    checkpoint_of,
    claim,
    lock_expired,
    lock_held,
    place_due,
    record_prefetched,
    record_resumed,
    record_stage,
    record_start,
    renew_leases,
    write_outcomes,
)

__all__ = [
    "CLAIMED_COLUMNS",
    "ERROR_FINGERPRINT_SQL",
    "EVENT",
    "IDEMPOTENCY_INDEX",
    "JOB",
    "NOTIFY_CHANNEL",
    "PLACE_BATCH",
    "Claim",
    "ClaimedJob",
    "Counts",
    "FailureGroup",
    "JobFilter",
    "JobRecord",
    "JobRow",
    "Minute",
    "NewJob",
    "Outcome",
    "QueueStats",
    "by_keys",
    "cancel_queued",
    "checkpoint_of",
    "claim",
    "count_eligible",
    "counts",
    "failure_groups",
    "get_job",
    "insert_jobs",
    "limits",
    "list_events",
    "list_jobs",
    "list_jobs_ops",
    "list_jobs_query",
    "lock_expired",
    "lock_held",
    "notify",
    "oldest_due",
    "operate_batch",
    "place_due",
    "queue_stats",
    "record_prefetched",
    "record_resumed",
    "record_stage",
    "record_start",
    "renew_leases",
    "request_cancel",
    "scopes",
    "throughput",
    "write_outcomes",
]
