"""A failed connection is reported in one line that names where, never the password."""

from __future__ import annotations

import re

import pytest

from heimdex.db import check_connection, make_engine
from heimdex.errors import DatabaseUnavailable
from heimdex_db.localpg import free_port


@pytest.mark.parametrize(
    "password", ["se/cr@et-tail", "a/b/longtail", "pa%ss%zzword", "us:er:pass/word", "p@ss:w/o%rd"]
)
def test_a_raw_password_with_url_characters_is_never_echoed(password: str) -> None:
    port = free_port()  # nothing listens there: a real refused connection
    engine = make_engine(f"postgresql://bob:{password}@127.0.0.1:{port}/ledger")
    assert engine.url.password == password
    assert engine.url.host == "127.0.0.1"
    with pytest.raises(DatabaseUnavailable) as caught:
        check_connection(engine)
    message = str(caught.value)
    assert message.startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port}/ledger as bob: ")
    assert "\n" not in message
    for piece in [password, *re.split(r"[/@:%]", password)]:
        if len(piece) > 2:
            assert piece not in message, message
