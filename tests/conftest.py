"""Session-wide fixtures shared by integration tests: test CA, local upstreams, a Bastion home with its CA.

Helper modules sit beside the tests and are imported by name (`from support.bastion import run_bastion`,
`from services import require_redis`), as pytest puts this directory on sys.path.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboardhelp import browser  # one Chromium per module that asks for it
from lockhistory import delete_prefix
from services import require_redis
from support.bastion import BastionServer, run_bastion
from support.certs import CertFiles, make_test_certs
from support.upstream import Upstream, run_upstream

__all__ = ["browser"]

REPO = Path(__file__).resolve().parent.parent
TESTDATA_RULES = REPO / "tests" / "testdata" / "policy"


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / ::1 / localhost."""
    return make_test_certs(tmp_path_factory.mktemp("test-certs"))


@pytest.fixture(scope="session")
def upstream(test_certs: CertFiles) -> Iterator[Upstream]:
    """Local echo/SSE/slow/websocket upstream on plain HTTP and HTTPS (test CA)."""
    with run_upstream(test_certs) as up:
        yield up


@pytest.fixture(scope="session")
def bastion_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Bastion home with its CA created once, shared by every server a test session starts."""
    from bastion.config import Home
    from bastion.proxy.ca import ensure_ca

    home = Home(tmp_path_factory.mktemp("bastion-home"))
    ensure_ca(home)
    return home.path


# -- lock history tests (tests/test_coord_lockhistory.py, tests/test_locks_history_proxy.py) ------------------


@pytest.fixture
def seed() -> int:
    """The random seed of a history run; printed so a failing run can be replayed with LOCKHISTORY_SEED."""
    value = int(os.environ.get("LOCKHISTORY_SEED") or random.randrange(1 << 30))
    print(f"lock history seed: {value} (LOCKHISTORY_SEED={value} replays it)")
    return value


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; only its keys are deleted afterwards."""
    value = f"bastiontest:{uuid.uuid4().hex}:"
    yield value
    delete_prefix(redis_url, value)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bastion_home: Path, test_certs: CertFiles,
           upstream: Upstream) -> Iterator[BastionServer]:
    """`bastion serve` on tests/testdata/policy/proxy.yaml (allow_private 127.0.0.0/8 and ::1), one per test module."""
    with run_bastion(tmp_path_factory.mktemp("bastion"), [TESTDATA_RULES / "proxy.yaml"], home=bastion_home,
                     upstream_ca=test_certs.ca_cert) as srv:
        yield srv
