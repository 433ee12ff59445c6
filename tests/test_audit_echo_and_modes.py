"""Two audit guarantees through a running `bastion serve`, with a real client (requests) and a local upstream:

- a secret masked in a request is masked wherever the upstream echoes it back (a JSON error quoting the key,
  a reflected header, a compressed answer, an answer cut at `audit.max_body_bytes` in the middle of the key),
  in everything `bastion audit` shows and in every byte of the files on disk;
- every file holding records or bodies (the SQLite database and its -wal/-shm, the spool, JSONL files) is
  owner-only from the moment it exists, whatever the umask, and files left wider are tightened with a warning.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import sqlite3
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from aiohttp import web
from auditproxy import MAX_BODY, TOKENS, read_records, wait_for_record, write_policy
from support.bastion import BastionServer, run_bastion, run_cli
from support.certs import CertFiles
from support.upstream import serve_in_thread

KEPT = "this part of the answer is not secret and must be stored as sent"


def _echo_app() -> web.Application:
    """An upstream that quotes what it was sent: the `x-api-key` and `Authorization` headers and the JSON
    body's `api_key`, in its JSON answer (optionally gzip-compressed) and in answer headers."""

    async def echo(request: web.Request) -> web.Response:
        sent = await request.json()
        key, auth = request.headers.get("x-api-key", ""), request.headers.get("Authorization", "")
        answer = {"error": {"message": f"invalid x-api-key {key}", "authorization_seen": auth,
                            "field_seen": sent.get("api_key"), "input": sent}, "kept": KEPT}
        data = json.dumps(answer).encode()
        headers = {"X-Echo-Key": key, "X-Echo-Authorization": auth}
        if request.query.get("gzip"):
            data, headers["Content-Encoding"] = gzip.compress(data), "gzip"
        return web.Response(body=data, content_type="application/json", headers=headers)

    async def cut(request: web.Request) -> web.Response:
        """A text answer longer than max_body_bytes whose stored part ends 16 characters into the key."""
        key = request.headers.get("x-api-key", "")
        filler = "k" * (MAX_BODY - len("echo: ") - 16)
        return web.Response(text=f"echo: {filler}{key} and more after the cut", content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/echo", echo)
    app.router.add_post("/v1/cut", cut)
    return app


@pytest.fixture(scope="module")
def echo_upstream(test_certs: CertFiles) -> Iterator[tuple[int, int]]:
    with serve_in_thread(_echo_app(), test_certs) as ports:
        yield ports


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask (files 0644 unless created otherwise), inherited by `bastion serve`."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _session(server: BastionServer) -> requests.Session:
    s = server.session("support-bot", TOKENS["support-bot"])
    return s


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _disk_bytes(home: Path) -> bytes:
    """Every file under `home` as stored, plus the audit database's bodies inflated (they are zlib-packed)."""
    raw = b"".join(p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file())
    db = home / "bastion.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for row in conn.execute("SELECT record, request_body, response_body FROM audit_records"):
            raw += row[0].encode() + b"".join(zlib.decompress(b) for b in row[1:] if b)
    finally:
        conn.close()
    return raw


def test_secrets_echoed_by_the_upstream_are_masked_everywhere(tmp_path: Path, test_certs: CertFiles,
                                                              echo_upstream: tuple[int, int], umask_022: None,
                                                              ) -> None:
    http_port, https_port = echo_upstream
    api_key = "key-" + secrets.token_hex(20)  # no known credential format: only its header name marks it
    bearer = secrets.token_urlsafe(36)
    field = "fld-" + secrets.token_hex(12)
    home = tmp_path / "home"
    audit = f"sqlite:///{home / 'bastion.db'}"
    headers = {"x-api-key": api_key, "Authorization": f"Bearer {bearer}"}
    with run_bastion(tmp_path / "srv", [write_policy(tmp_path / "rules.yaml")], home=home,
                     upstream_ca=test_certs.ca_cert) as server:
        s = _session(server)
        ids = []
        for url in (f"https://localhost:{https_port}/v1/echo", f"http://127.0.0.1:{http_port}/v1/echo?gzip=1"):
            resp = s.post(url, json={"api_key": field, "prompt": "hello"}, headers=headers, timeout=10)
            assert resp.status_code == 200 and resp.json()["error"]["field_seen"] == field  # the agent sees it all
            assert resp.headers["X-Echo-Key"] == api_key
            ids.append(resp.headers["X-Bastion-Request-Id"])
        resp = s.post(f"http://127.0.0.1:{http_port}/v1/cut", json={}, headers=headers, timeout=10)
        assert resp.status_code == 200 and api_key in resp.text
        ids.append(resp.headers["X-Bastion-Request-Id"])
        records = {rid: wait_for_record(audit, rid) for rid in ids}

        shown = [run_cli("audit", "show", rid, "--format", "json", "--audit", audit, "--home", str(home))
                 for rid in ids]
        assert all(out.returncode == 0 for out in shown), [out.stderr for out in shown]
        verify = run_cli("audit", "verify", "--audit", audit, "--home", str(home))
        assert verify.returncode == 0, verify.stdout + verify.stderr  # digests describe the stored copies

    for rid, out in zip(ids[:2], shown, strict=False):
        doc = json.loads(out.stdout)
        answer = json.loads(doc["response"]["body"]["content"]["text"])
        assert answer["kept"] == KEPT and answer["error"]["message"].startswith("invalid x-api-key [REDACTED:")
        assert answer["error"]["field_seen"].startswith("[REDACTED:")
        echoed = {h["name"].lower(): h["value"] for h in doc["response"]["headers"]}
        sent = {h["name"].lower(): h["value"] for h in doc["request"]["headers"]}
        assert echoed["x-echo-key"] == sent["x-api-key"]  # the echo's mask is the original's
        assert echoed["x-echo-authorization"] == sent["authorization"]
        assert {"/response/headers/x-echo-key", "/response/body/error/message"} <= set(records[rid].redactions)
    cut = json.loads(shown[2].stdout)["response"]["body"]
    assert cut["truncated"] and cut["content"]["text"].startswith("echo: kkk")
    assert cut["content"]["text"].endswith("]") and api_key[:16] not in cut["content"]["text"]

    everything = [out.stdout.encode() for out in shown] + [_disk_bytes(home)]
    everything += [json.dumps(r.to_json(with_content=True)).encode() for r in read_records(audit)]
    for blob in everything:
        for secret in (api_key, bearer, field):
            assert secret.encode() not in blob
            assert secret[:16].encode() not in blob  # not even the part before the cut


def _private(home: Path) -> dict[str, int]:
    """Modes of the files under `home` that hold records, bodies or coordination state. Leaves out the CA's
    public certificates and the spool's `owner` file (two process ids)."""
    out = {}
    for p in sorted(home.rglob("*")):
        rel = str(p.relative_to(home))
        if p.name.startswith("bastion.db") or (rel.startswith("spool") and p.name != "owner") \
                or rel.startswith("jsonl"):
            out[rel] = _mode(p)
    return out


def test_files_holding_records_are_owner_only_from_the_start(tmp_path: Path, test_certs: CertFiles,
                                                              echo_upstream: tuple[int, int], umask_022: None,
                                                              ) -> None:
    home = tmp_path / "home"
    with run_bastion(tmp_path / "srv", [write_policy(tmp_path / "rules.yaml")], home=home,
                     upstream_ca=test_certs.ca_cert) as server:
        resp = _session(server).post(f"http://127.0.0.1:{echo_upstream[0]}/v1/echo", json={"n": 1}, timeout=10)
        wait_for_record(f"sqlite:///{home / 'bastion.db'}", resp.headers["X-Bastion-Request-Id"])
        modes = _private(home)
        assert "was readable by other users" not in server.logs()  # nothing was ever created wider
    assert {"bastion.db", "bastion.db-wal", "bastion.db-shm", "spool", "spool/redaction.key"} <= set(modes)
    assert any(name.startswith("spool/seg-") for name in modes)
    expected = {name: 0o700 if (home / name).is_dir() else 0o600 for name in modes}
    assert modes == expected


def test_wider_files_left_behind_are_tightened_with_a_warning(tmp_path: Path, test_certs: CertFiles,
                                                              echo_upstream: tuple[int, int], umask_022: None,
                                                              ) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "spool").mkdir(mode=0o755)
    old = sqlite3.connect(home / "bastion.db")  # an older version's database, still open: -wal and -shm exist
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE leftover (x)")
    old.execute("INSERT INTO leftover VALUES (1)")
    old.commit()
    try:
        assert {_mode(home / f"bastion.db{s}") for s in ("", "-wal", "-shm")} == {0o644}
        with run_bastion(tmp_path / "srv", [write_policy(tmp_path / "rules.yaml")], home=home,
                         upstream_ca=test_certs.ca_cert) as server:
            resp = _session(server).post(f"http://127.0.0.1:{echo_upstream[0]}/v1/echo", json={"n": 1}, timeout=10)
            wait_for_record(f"sqlite:///{home / 'bastion.db'}", resp.headers["X-Bastion-Request-Id"])
            modes = _private(home)
            logs = server.logs()
    finally:
        old.close()
    assert {modes[f"bastion.db{s}"] for s in ("", "-wal", "-shm")} == {0o600}
    assert modes == {name: 0o700 if (home / name).is_dir() else 0o600 for name in modes}
    for name in ("bastion.db", "bastion.db-wal", "spool"):
        assert logs.count(f"{home / name} was readable by other users") == 1, logs[-3000:]


def test_jsonl_files_are_owner_only(tmp_path: Path, test_certs: CertFiles, echo_upstream: tuple[int, int],
                                    umask_022: None) -> None:
    home = tmp_path / "home"
    jsonl = home / "jsonl"
    jsonl.mkdir(parents=True, mode=0o755)  # a directory made by hand: left as it is
    stale = jsonl / "w00000000000000aa"  # a chain an older version wrote with the umask's modes
    stale.mkdir(mode=0o755)
    (stale / "000000000001.jsonl").write_bytes(b"")
    os.chmod(stale / "000000000001.jsonl", 0o644)
    with run_bastion(tmp_path / "srv", [write_policy(tmp_path / "rules.yaml")], home=home,
                     upstream_ca=test_certs.ca_cert, extra_args=["--audit", f"jsonl:///{jsonl}"]) as server:
        resp = _session(server).post(f"http://127.0.0.1:{echo_upstream[0]}/v1/echo", json={"n": 1}, timeout=10)
        wait_for_record(f"jsonl:///{jsonl}", resp.headers["X-Bastion-Request-Id"])
        modes = _private(home)
    written = [name for name in modes if name.endswith(".jsonl") and not name.startswith(f"jsonl/{stale.name}")]
    assert written, modes
    assert modes.pop("jsonl") == 0o755
    assert modes == {name: 0o700 if (home / name).is_dir() else 0o600 for name in modes}


# -- the same, store by store, without a server -----------------------------------------------------------------


async def test_jsonl_rotated_compressed_and_retained_files_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    from bastion.audit.retention import apply_retention
    from bastion.audit.sample import sample_exchange
    from bastion.audit.sinks import open_store
    from bastion.audit.writer import AuditWriter

    hour, t0 = 3600 * 1_000_000, 1_795_000_000_000_000
    url = f"jsonl:///{tmp_path}/logs"
    writer = await AuditWriter.open(url, tmp_path / "spool", store_options={"max_file_bytes": 12_000})
    for k in range(1, 41):
        rec, req, resp = sample_exchange(seed=k, body_words=60)
        rec.started_us, rec.ended_us = t0 + k * hour, t0 + k * hour + 1000
        assert writer.submit(rec, req, resp)
    assert await writer.flush()
    await writer.close()
    async with open_store(url) as store:
        result = await apply_retention(store, records=20.5 * 3600, bodies=15.5 * 3600, now=t0 + int(40.5 * hour))
        assert result.records > 0 and result.bodies > 0
    files = {p.name: _mode(p) for p in (tmp_path / "logs").rglob("*") if p.is_file()}
    assert any(n.endswith(".jsonl.gz") for n in files) and any(".purged." in n for n in files)
    assert "pruned.json" in files and files == dict.fromkeys(files, 0o600)


async def test_the_lock_store_file_is_created_owner_only(tmp_path: Path, umask_022: None) -> None:
    from bastion.coord.sqlite import SqliteLockStore

    path = tmp_path / "locks.db"
    async with SqliteLockStore(path) as store:
        assert await store.acquire("ticket:1", "support-bot", 30)
        modes = {p.name: _mode(p) for p in tmp_path.iterdir()}
    assert modes["locks.db"] == 0o600 and set(modes.values()) == {0o600}
