"""Nothing is lost: the audit sink going away in the middle of traffic, the proxy killed with SIGKILL, a graceful
shutdown. Each test runs its own `bastion serve` on its own home.

PostgreSQL is taken away by putting a TCP forwarder between the proxy and the real server and cutting it
(listener closed, live connections reset), then restoring it on the same port.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from auditproxy import (
    AuditUpstream,
    Forwarder,
    Traffic,
    call,
    drop_schema,
    read_records,
    run_audit_upstream,
    session,
    wait_for_records,
    write_policy,
)
from services import POSTGRES_HOST, POSTGRES_PORT, require_postgres
from support.bastion import BastionServer, run_bastion, run_cli
from support.certs import CertFiles


@pytest.fixture(scope="module")
def audit_upstream(test_certs: CertFiles) -> Iterator[AuditUpstream]:
    with run_audit_upstream(test_certs) as up:
        yield up


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """(dsn, schema): a schema unique to the test, dropped afterwards."""
    dsn = require_postgres()
    schema = f"bastiontest_{uuid.uuid4().hex[:12]}"
    yield dsn, schema
    asyncio.run(drop_schema(dsn, schema))


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder((POSTGRES_HOST, POSTGRES_PORT)).start()
    yield fwd
    fwd.close()


def metric(server: BastionServer, name: str) -> float:
    status, raw = server.admin_get("/metrics")
    m = re.search(rf"^{name} (\S+)$", raw.decode(), re.MULTILINE)
    assert status == 200 and m, name
    return float(m.group(1))


def wait_metric(server: BastionServer, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.05)


def count_rows(dsn: str, schema: str) -> int:
    async def main() -> int:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            # the schema name is the test's own uuid-based identifier
            return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_records'))  # noqa: S608
        finally:
            await conn.close()
    return asyncio.run(main())


def test_postgres_outage_mid_traffic(tmp_path: Path, test_certs: CertFiles, audit_upstream: AuditUpstream,
                                     pg_schema: tuple[str, str], forwarder: Forwarder) -> None:
    dsn, schema = pg_schema
    direct = f"{dsn}?schema={schema}"
    via = f"postgresql://postgres@127.0.0.1:{forwarder.port}/test?schema={schema}"
    rules = write_policy(tmp_path / "rules.yaml")
    with run_bastion(tmp_path / "srv", [rules], home=tmp_path / "home", extra_args=["--audit", via]) as server:
        s = session(server)
        ids = [call(s, audit_upstream, f"before-{i}") for i in range(10)]
        wait_for_records(direct, ids)
        wait_metric(server, "bastion_audit_backlog", 0)

        forwarder.cut()
        ids += [call(s, audit_upstream, f"during-{i}") for i in range(20)]  # calls go on: records wait in the spool
        assert count_rows(dsn, schema) == 10
        assert metric(server, "bastion_audit_backlog") == 20
        status, _ = server.admin_get("/readyz")
        assert status == 200

        forwarder.restore()
        ids += [call(s, audit_upstream, f"after-{i}") for i in range(5)]
        wait_for_records(direct, ids, timeout=60)
        assert metric(server, "bastion_audit_write_errors_total") >= 1

    stored = read_records(direct)
    assert [r.id for r in stored] == ids  # every record, in the order the calls were made
    assert [r.chain.seq for r in stored if r.chain] == sorted(r.chain.seq for r in stored if r.chain)
    verify = run_cli("audit", "verify", "--audit", direct)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("sink", ["sqlite", "postgresql-cut"])
def test_sigkill_loses_no_completed_call(tmp_path: Path, test_certs: CertFiles, audit_upstream: AuditUpstream,
                                         sink: str, request: pytest.FixtureRequest) -> None:
    """SIGKILL in the middle of traffic, restart on the same home: every call whose answer reached the agent
    has its record after the restart, up to the last one before the kill. With `postgresql-cut` the sink is
    away during the whole first run, so those records exist only in the spool when the process dies."""
    home = tmp_path / "home"
    rules = write_policy(tmp_path / "rules.yaml")
    forwarder: Forwarder | None = None
    if sink == "sqlite":
        url = f"sqlite:///{home / 'bastion.db'}"
        read_url, extra = url, []
    else:
        dsn, schema = request.getfixturevalue("pg_schema")
        forwarder = request.getfixturevalue("forwarder")
        url = f"postgresql://postgres@127.0.0.1:{forwarder.port}/test?schema={schema}"
        read_url, extra = f"{dsn}?schema={schema}", ["--audit", url]
        forwarder.cut()

    with run_bastion(tmp_path / "run1", [rules], home=home, extra_args=extra) as server:
        traffic = Traffic(server, audit_upstream)
        traffic.start()
        traffic.wait_for(30, first_done_before=1.5)
        server.proc.kill()
        server.proc.wait(10)
        traffic.join(15)
    owed = [rid for _, rid in traffic.completed]  # every answer the agent got before the kill
    assert len(owed) >= 30

    if forwarder is not None:
        forwarder.restore()
    with run_bastion(tmp_path / "run2", [rules], home=home, extra_args=extra):
        wait_for_records(read_url, owed, timeout=60)
        args = ("--audit", read_url, "--home", str(home))
        verify = run_cli("audit", "verify", *args)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        tail = run_cli("audit", "tail", "-n", "3", *args)
        assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3
        show = run_cli("audit", "show", owed[-1], *args)
        assert show.returncode == 0 and owed[-1] in show.stdout
        export = run_cli("audit", "export", "--format", "har", *args)
        assert export.returncode == 0 and all(rid in export.stdout for rid in owed)


def test_graceful_shutdown_drains_the_spool(tmp_path: Path, test_certs: CertFiles, audit_upstream: AuditUpstream,
                                           pg_schema: tuple[str, str], forwarder: Forwarder) -> None:
    """Records still in the spool when SIGTERM comes (the sink was away until a moment ago) are in the sink
    when the process has exited: shutdown drains after the last call, without waiting for a next start."""
    dsn, schema = pg_schema
    rules = write_policy(tmp_path / "rules.yaml")
    via = f"postgresql://postgres@127.0.0.1:{forwarder.port}/test?schema={schema}"
    with run_bastion(tmp_path / "srv", [rules], home=tmp_path / "home", extra_args=["--audit", via]) as server:
        s = session(server)
        ids = [call(s, audit_upstream, "first")]
        wait_for_records(f"{dsn}?schema={schema}", ids)
        wait_metric(server, "bastion_audit_backlog", 0)
        forwarder.cut()
        ids += [call(s, audit_upstream, f"drain-{i}") for i in range(20)]
        assert metric(server, "bastion_audit_backlog") == 20
        forwarder.restore()
        assert server.stop() == 0
    assert count_rows(dsn, schema) == 21
    assert [r.id for r in read_records(f"{dsn}?schema={schema}", bodies=False)] == ids
