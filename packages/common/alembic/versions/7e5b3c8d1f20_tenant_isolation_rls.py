"""tenant isolation: row level security for the ledger

Revision ID: 7e5b3c8d1f20
Revises: 4c2f9a1e7b3d

On Supabase every table in `public` is reachable through the Data API with the anon or
authenticated key; this revision makes the database itself enforce the tenancy:
- the roles the policies name (`anon`, `authenticated`, `service_role`) are created NOLOGIN
  when missing (plain PostgreSQL), so one history applies to both targets; roles are
  cluster-wide and never dropped here (Supabase owns them there; elsewhere other databases of
  the cluster may use them);
- tenant tables get RLS and policies keyed on the org of the request's JWT claims, read by
  `heimdex_private.current_org_id()` from `request.jwt.claims` (what Supabase's `auth.jwt()`
  reads), NULL, so nothing visible, when the claim is missing or malformed;
- `authenticated` reads and creates queued jobs of its own org and reads their events; it never
  updates or deletes; `anon` gets nothing; `service_role` gets full access by grant and policy,
  whether or not it has BYPASSRLS;
- backend-only tables get RLS and no policy: only their owner (the backend) reaches them.
The table owner (the backend's own user) is not subject to RLS: the API and workers are
unaffected. See docs/security.md.

The downgrade drops the policies and the function, disables RLS on the tenant tables and
revokes every grant this revision made; it does not restore grants Supabase's default
privileges had given anon/authenticated, because a downgrade must never reopen the Data API.
"""

from __future__ import annotations

from typing import NamedTuple

from alembic import op

from heimdex_db.online import set_lock_timeout

revision = "7e5b3c8d1f20"
down_revision = "4c2f9a1e7b3d"
branch_labels = None
depends_on = None
supabase_slug = "tenant_isolation_rls"

PRIVATE_SCHEMA = "heimdex_private"
ROLES = ("anon", "authenticated", "service_role")
# Tables with an org a tenant may see through the Data API.
TENANT_TABLES = ("job", "job_event")
# Tables only the backend touches. Their own revision enables RLS; this one makes sure and
# revokes the Data API roles, and its downgrade leaves them as their own revision made them.
BACKEND_ONLY_TABLES: tuple[str, ...] = ("job_outbox",)
# What `authenticated` may set when it creates a job; everything else (status, attempt,
# timestamps, errors, scheduling knobs) takes its default and is the backend's to change.
JOB_INSERT_COLUMNS = ("org_id", "type", "params", "idempotency_key", "requested_by")

CLAIMED_ORG = f"(SELECT {PRIVATE_SCHEMA}.current_org_id())"


class Policy(NamedTuple):
    table: str
    name: str
    command: str
    role: str
    using: str | None = None
    check: str | None = None

    def create_sql(self) -> str:
        sql = (
            f"CREATE POLICY {self.name} ON public.{self.table} AS PERMISSIVE"
            f" FOR {self.command} TO {self.role}"
        )
        if self.using is not None:
            sql += f" USING ({self.using})"
        if self.check is not None:
            sql += f" WITH CHECK ({self.check})"
        return sql


POLICIES = (
    Policy(
        "job", "job__authenticated_select", "SELECT", "authenticated", f"org_id = {CLAIMED_ORG}"
    ),
    Policy(
        "job",
        "job__authenticated_insert",
        "INSERT",
        "authenticated",
        check=f"org_id = {CLAIMED_ORG} AND status = 'queued' AND attempt = 0",
    ),
    Policy("job", "job__service_role_all", "ALL", "service_role", "true", "true"),
    Policy(
        "job_event",
        "job_event__authenticated_select",
        "SELECT",
        "authenticated",
        # Evaluated with job's own policies applied: an event is visible exactly when its job is.
        "EXISTS (SELECT 1 FROM public.job AS j WHERE j.id = job_event.job_id)",
    ),
    Policy("job_event", "job_event__service_role_all", "ALL", "service_role", "true", "true"),
)


def _create_missing_roles() -> None:
    names = ", ".join(f"'{r}'" for r in ROLES)
    op.execute(f"""
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY[{names}] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE 'CREATE ROLE ' || quote_ident(r) || ' NOLOGIN';
        EXCEPTION
            -- Roles are cluster-wide: a migration of another database may create it meanwhile.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION USING
                    MESSAGE = 'role ' || r || ' does not exist and ' || current_user
                              || ' may not create it',
                    HINT = 'create the roles anon, authenticated and service_role (NOLOGIN) '
                           'as a superuser, or grant CREATEROLE to the migrating user, '
                           'and upgrade again; nothing was changed';
        END;
    END LOOP;
END
$roles$""")


def _create_claim_function() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {PRIVATE_SCHEMA}")
    # Never raises: a malformed claim must see nothing, not abort with an error.
    # Policies call it as an InitPlan, `(SELECT ...)`, so once per statement, not per row.
    op.execute(f"""
CREATE FUNCTION {PRIVATE_SCHEMA}.current_org_id() RETURNS uuid
    LANGUAGE plpgsql STABLE SECURITY INVOKER
    SET search_path = ''
AS $fn$
DECLARE
    claims text := current_setting('request.jwt.claims', true);
BEGIN
    IF claims IS NULL OR claims = '' THEN
        RETURN NULL;
    END IF;
    RETURN (claims::jsonb ->> 'org_id')::uuid;
EXCEPTION
    WHEN data_exception THEN
        RETURN NULL;
END
$fn$""")
    op.execute(
        f"COMMENT ON FUNCTION {PRIVATE_SCHEMA}.current_org_id() IS "
        "'org_id claim of the request JWT (request.jwt.claims), NULL when missing or malformed'"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {PRIVATE_SCHEMA}.current_org_id() FROM PUBLIC")
    op.execute(f"GRANT USAGE ON SCHEMA {PRIVATE_SCHEMA} TO authenticated")
    op.execute(f"GRANT EXECUTE ON FUNCTION {PRIVATE_SCHEMA}.current_org_id() TO authenticated")


def upgrade() -> None:
    set_lock_timeout()
    _create_missing_roles()
    _create_claim_function()

    for table in (*TENANT_TABLES, *BACKEND_ONLY_TABLES):
        op.execute(f"ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY")
        # Supabase's default privileges give anon and authenticated everything on new tables.
        op.execute(f"REVOKE ALL ON public.{table} FROM PUBLIC, anon, authenticated")
    for table in TENANT_TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.{table} TO service_role")
    op.execute("GRANT SELECT ON public.job, public.job_event TO authenticated")
    op.execute(f"GRANT INSERT ({', '.join(JOB_INSERT_COLUMNS)}) ON public.job TO authenticated")
    for policy in POLICIES:
        op.execute(policy.create_sql())


def downgrade() -> None:
    set_lock_timeout()
    for policy in reversed(POLICIES):
        op.execute(f"DROP POLICY {policy.name} ON public.{policy.table}")
    for table in reversed(TENANT_TABLES):
        # Table-level REVOKE also takes back the column-level INSERT grant.
        op.execute(f"REVOKE ALL ON public.{table} FROM anon, authenticated, service_role")
        op.execute(f"ALTER TABLE public.{table} DISABLE ROW LEVEL SECURITY")
    op.execute(f"DROP FUNCTION {PRIVATE_SCHEMA}.current_org_id()")
    op.execute(f"REVOKE USAGE ON SCHEMA {PRIVATE_SCHEMA} FROM authenticated")
