"""Which pool mode a URL is taken for, and which URL needs a session."""

from __future__ import annotations

import pytest

from heimdex.errors import HeimdexError
from heimdex.settings import PoolMode, Settings, load_settings

SUPABASE_POOLER = "aws-0-eu-west-1.pooler.supabase.com"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "HEIMDEX_DB_POOL_MODE", "HEIMDEX_SESSION_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no .env


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        (f"postgresql://postgres.ref:pw@{SUPABASE_POOLER}:6543/postgres", PoolMode.TRANSACTION),
        (f"postgresql://postgres.ref:pw@{SUPABASE_POOLER}:5432/postgres", PoolMode.SESSION),
        ("postgresql://postgres:pw@db.ref.supabase.co:5432/postgres", PoolMode.DIRECT),
        ("postgresql://heimdex@pgbouncer.internal:6432/heimdex", PoolMode.DIRECT),
        ("postgresql://heimdex@db:5432/heimdex", PoolMode.DIRECT),
    ],
)
def test_auto_reads_supabases_pooler_from_the_url(
    monkeypatch: pytest.MonkeyPatch, url: str, mode: PoolMode
) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    settings = Settings()
    assert settings.pool_mode is mode
    assert (settings.session_url is None) is (mode is PoolMode.TRANSACTION)


def test_a_declared_mode_wins_and_a_session_url_serves_what_needs_a_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://heimdex@pgbouncer:6432/heimdex")
    monkeypatch.setenv("HEIMDEX_DB_POOL_MODE", "Transaction")
    settings = Settings()
    assert settings.pool_mode is PoolMode.TRANSACTION
    assert settings.session_url is None
    monkeypatch.setenv("HEIMDEX_SESSION_DATABASE_URL", "postgresql://heimdex@db:5432/heimdex")
    session = Settings().session_url
    assert session is not None and (session.host, session.port) == ("db", 5432)


def test_a_session_url_on_a_transaction_pooler_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "HEIMDEX_SESSION_DATABASE_URL", f"postgresql://u:p@{SUPABASE_POOLER}:6543/postgres"
    )
    with pytest.raises(HeimdexError, match="HEIMDEX_SESSION_DATABASE_URL must be a direct"):
        load_settings()


def test_an_unknown_mode_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDEX_DB_POOL_MODE", "statement")
    with pytest.raises(HeimdexError, match="HEIMDEX_DB_POOL_MODE") as caught:
        load_settings()
    assert "\n" not in str(caught.value)
