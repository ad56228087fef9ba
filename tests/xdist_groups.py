"""Make `@pytest.mark.xdist_group` work on pytest 9 (imported as a hook by tests/conftest.py).

pytest-xdist 3.8 (`--dist loadgroup`) tells the controller an item's group by appending
`@<group>` to `item._nodeid` on the worker; pytest 9 builds `nodeid` from `item._id` instead, so
the suffix never leaves the worker and every grouped test is scheduled on its own: an expensive
module fixture (the 1M-row plans database) was built on every worker. This carries the suffix
over to the id pytest 9 reads. A no-op without xdist, without groups, or once xdist sets the id
itself. tests/test_xdist_groups.py checks it in a pytest run of its own.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Generator[None]:
    yield  # after every implementation, xdist's included
    suffixed = [
        (item, item.__dict__["_nodeid"])
        for item in items
        if "@" in str(item.__dict__.get("_nodeid", "")) and "@" not in item.nodeid
    ]
    if not suffixed:
        return
    from _pytest.nodeid import NodeId  # pytest 9's id type, only needed there

    for item, nodeid in suffixed:
        item._id = NodeId.parse(nodeid)  # type: ignore[attr-defined]
