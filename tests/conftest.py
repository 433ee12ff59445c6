"""Session-wide fixtures shared by integration tests: test CA, local upstreams, a Bastion home with its CA.

Helper modules sit beside the tests and are imported by name (`from support.bastion import run_bastion`,
`from services import require_redis`), as pytest puts this directory on sys.path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import CertFiles, make_test_certs
from support.upstream import Upstream, run_upstream

REPO = Path(__file__).resolve().parent.parent
TESTDATA_RULES = REPO / "rules" / "testdata"


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
