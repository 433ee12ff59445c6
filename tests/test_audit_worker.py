"""The audit worker process beside `bastion serve`: what happens when it dies, when the proxy dies, and the frames
between them.

The worker is found as the child process of the server whose command line names `bastion.audit.worker`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from auditproxy import AuditUpstream, Traffic, call, run_audit_upstream, session, wait_for_records, write_policy
from support.bastion import BastionServer, run_bastion, run_cli
from support.certs import CertFiles

from bastion.audit import ipc
from bastion.audit.bodies import capture_bytes
from bastion.audit.client import AuditClient
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import RecordQuery, open_store
from bastion.audit.snapshot import DecisionTuple, ExchangeSnapshot, ResponseFacts, to_record


@pytest.fixture(scope="module")
def audit_upstream(test_certs: CertFiles) -> Iterator[AuditUpstream]:
    with run_audit_upstream(test_certs) as up:
        yield up


def worker_pid(server: BastionServer, timeout: float = 30.0) -> int:
    """The server's audit worker (waiting for one while it is being restarted)."""
    deadline = time.monotonic() + timeout
    pid = server.proc.pid
    while True:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"bastion.audit.worker" in cmdline:
                return int(child)
        assert time.monotonic() < deadline, "the server has no audit worker"
        time.sleep(0.05)


def wait_ready(server: BastionServer, ready: bool, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, raw = server.admin_get("/readyz")
        if (status == 200) == ready:
            return json.loads(raw)
        assert time.monotonic() < deadline, f"/readyz never became {'ready' if ready else 'unready'}: {raw!r}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # no such process (any more)
        return True


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.02)


def test_a_dead_worker_is_restarted_and_deny_refuses_calls_meanwhile(tmp_path: Path, test_certs: CertFiles,
                                                                     audit_upstream: AuditUpstream) -> None:
    """SIGKILL the worker, and keep its successor from starting for a while (its spool's lock file is made a
    directory, so it cannot open the spool): calls are refused with 503 audit_unavailable and /readyz says why;
    once the spool is usable again a new worker takes over, records flow and the chain is intact."""
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'bastion.db'}"
    with run_bastion(tmp_path / "srv", [write_policy(tmp_path / "rules.yaml")], home=home) as server:
        s = session(server)
        ids = [call(s, audit_upstream, "before")]
        wait_for_records(url, ids)
        first = worker_pid(server)
        lock = home / "spool" / "lock"

        os.kill(first, signal.SIGKILL)
        wait_gone(first)
        lock.unlink()
        lock.mkdir()  # the restarted worker now fails to open the spool, and is retried with a growing delay
        unready = wait_ready(server, ready=False)
        assert "audit worker is not running" in unready["checks"]["audit"]["detail"]
        resp = s.post(f"{audit_upstream.http_url}/while-down", json={}, timeout=10)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
        assert resp.json()["error"]["type"] == "audit_unavailable"
        server.wait_for_log(r"audit worker could not start again: cannot open the audit spool")

        lock.rmdir()
        wait_ready(server, ready=True)
        assert worker_pid(server) != first
        ids.append(call(s, audit_upstream, "after"))
        wait_for_records(url, ids)
        server.wait_for_log(r"audit worker \d+ exited")
        server.wait_for_log(r"audit worker \d+ is back")
    verify = run_cli("audit", "verify", "--audit", url, "--home", str(home))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_killed_proxy_leaves_its_spool_to_its_successor(tmp_path: Path, test_certs: CertFiles,
                                                          audit_upstream: AuditUpstream) -> None:
    """SIGKILL the proxy while its worker is stopped: a new proxy on the same home starts while the old worker
    still holds the spool. The new worker waits for the old one (which spools what it received and exits)
    instead of taking a second slot, and every call completed more than a second before the kill is recorded."""
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'bastion.db'}"
    rules = write_policy(tmp_path / "rules.yaml")
    with run_bastion(tmp_path / "run1", [rules], home=home) as server:
        traffic = Traffic(server, audit_upstream)
        traffic.start()
        traffic.wait_for(20, first_done_before=1.5)
        orphan = worker_pid(server)
        os.kill(orphan, signal.SIGSTOP)
        killed_at = time.monotonic()
        server.proc.kill()
        server.proc.wait(10)
        traffic.join(15)
    owed = [rid for done, rid in traffic.completed if done < killed_at - 1.0]
    assert owed

    # The old worker resumes only once the new one says it is waiting for it: the new proxy cannot be ready before.
    waiting_line = r"audit spool \S+ is held by the worker of a proxy that is gone"
    thaw = threading.Thread(target=thaw_when_logged, args=(tmp_path / "run2" / "stderr.log", waiting_line, orphan),
                            daemon=True)
    thaw.start()
    try:
        with run_bastion(tmp_path / "run2", [rules], home=home, ready_timeout=60) as server:
            assert re.search(waiting_line, server.logs())
            wait_gone(orphan)
            assert not (home / "spool.1").exists() and "spool.1" not in server.logs()
            wait_for_records(url, owed, timeout=60)
    finally:
        if not gone(orphan):
            os.kill(orphan, signal.SIGCONT)


def thaw_when_logged(log: Path, pattern: str, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            break
        time.sleep(0.05)
    os.kill(pid, signal.SIGCONT)


def test_frames_survive_any_split_and_garbage_is_refused() -> None:
    values = [(ipc.EXCHANGE, {"n": i, "blob": os.urandom(i * 37)}) for i in range(20)]
    stream = b"".join(ipc.frame(kind, value) for kind, value in values)
    for size in (1, 7, 4096, len(stream)):
        buffer = ipc.FrameBuffer()
        got = []
        for start in range(0, len(stream), size):
            got += buffer.feed(stream[start:start + size])
        assert got == values and not buffer.partial
    cut = ipc.FrameBuffer()
    assert cut.feed(stream[:10]) == [] and cut.partial
    with pytest.raises(ipc.ProtocolError):
        ipc.FrameBuffer().feed(b"\x00\x00\x00\x03Xabc")


def test_a_snapshot_crosses_the_pipe_unchanged() -> None:
    """What the proxy sends is what the worker builds the record from: named parts and captured bodies too."""
    streamed = capture_bytes(b"data: 1\n\n" * 10, 16, content_type="text/event-stream", complete=False)
    snap = ExchangeSnapshot(
        id="01a20d4e-0000-7000-8000-000000000009", outcome="client_gone", started=1795514400.25,
        ended_us=1795514401_000000, request_end=1795514400.26, decided=1795514400.27, response_end=None,
        agent="bot", auth="basic", claimed=None, client=("127.0.0.1", 40000), method="POST", scheme="https",
        host="api.example.com", port=443, target="/v1/chat?stream=1", http_version="HTTP/2.0",
        request_fields=((b"content-type", b"application/json"),), request_body=b'{"q": 1}',
        response=ResponseFacts(200, "OK", "HTTP/2.0", ((b"content-type", b"text/event-stream"),), "upstream", True),
        response_body=streamed, error=("client_gone", "Client disconnected."),
        decision=DecisionTuple("allow", "allow", "enforce", ("chat",), "rule", None, ()), refusal=None,
        locks=({"event": "acquired", "key": "ticket:1", "fence": 3},), approval=None, policy_revision="abc",
        upstream=("10.0.0.5", 443), upstream_tried=True, forwarded_path=None)
    [(kind, wire)] = ipc.FrameBuffer().feed(ipc.frame(ipc.EXCHANGE, snap.to_wire()))
    back = ExchangeSnapshot.from_wire(wire)
    assert kind == ipc.EXCHANGE and back == snap and back.response_body == streamed
    record, request_body, response_body = to_record(back, 1 << 20)
    assert record.request.url == "https://api.example.com/v1/chat?stream=1" and record.upstream == "10.0.0.5:443"
    assert record.response is not None and record.response.streamed and record.locks[0].fence == 3
    assert request_body is not None and request_body.raw == b'{"q": 1}'
    assert response_body == streamed and not response_body.complete and response_body.size == 90


async def test_a_worker_that_falls_behind_makes_deny_refuse_instead_of_losing_records(tmp_path: Path) -> None:
    """The worker stops reading (SIGSTOP): exchanges pile up in the proxy until `max_pending_bytes`; from then on
    the client says `overloaded` and, with on_failure deny, the proxy would refuse calls. Every exchange it did
    take reaches the store once the worker runs again."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    client = await AuditClient.spawn(url, tmp_path, url, max_pending_bytes=256 << 10)
    await client.start(AuditConfig(on_failure="deny"))
    pid = client.worker_pid
    assert pid is not None
    base = ExchangeSnapshot(
        id="", outcome="forwarded", started=1795514400.0, ended_us=1795514400_500000, request_end=1795514400.01,
        decided=1795514400.02, response_end=1795514400.4, agent="bot", auth="basic", claimed=None,
        client=("127.0.0.1", 40000), method="POST", scheme="https", host="api.example.com", port=443,
        target="/v1/upload", http_version="HTTP/1.1", request_fields=((b"content-type", b"text/plain"),),
        request_body=os.urandom(64 << 10), response=ResponseFacts(200, "OK", "HTTP/1.1", ()),
        response_body=None, error=None, decision=None, refusal=None, locks=(), approval=None,
        policy_revision=None, upstream=("10.0.0.5", 443), upstream_tried=True, forwarded_path=None)
    os.kill(pid, signal.SIGSTOP)
    taken: list[str] = []
    try:
        for i in range(200):  # 12.8 MB at most; the pipe holds 1 MiB and the client 256 KiB more
            if client.must_refuse():
                break
            snap = base._replace(id=f"01a20d4e-0000-7000-8000-{i:012d}")
            assert client.submit_exchange(snap)
            taken.append(snap.id)
            await asyncio.sleep(0.005)  # lets the client write what it queued
        assert client.must_refuse() and client.refusal() == "overloaded"
        assert not client.submit_exchange(base._replace(id="01a20d4e-0000-7000-8000-999999999999"))
    finally:
        os.kill(pid, signal.SIGCONT)
    async with asyncio.timeout(60):
        assert await client.flush()
    assert not client.must_refuse()
    await client.close()
    store = open_store(url)
    await store.open()
    try:
        page = await store.query(RecordQuery(limit=500, ascending=True))
    finally:
        await store.close()
    assert [r.id for r in page.records] == taken
