"""The multi-host tests use the fault tests' stack (tests/support/harness.py) and build their hosts with
tests/support/netsim.py; each test gets its own bridge and subnet."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netsim import Net, available

_subnets = itertools.count(10 + os.getpid() % 200)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    why = available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"multi-host tests need network namespaces on CI: {why}")
        pytest.skip(why)
    k = next(_subnets) % 250
    n = Net(f"{k:x}", k, tmp_path)
    try:
        yield n
    finally:
        n.close()
