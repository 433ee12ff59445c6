"""Body capture (cap, incremental sha256), bounded Content-Encoding decoding, compression at rest, and
decompression bombs that must be stored cut without exhausting memory."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import brotli
import pytest
import zstandard

from bastion.audit.bodies import BodyCapture, DecodeError, capture_bytes, decode_content, pack, unpack

TEXT = b"".join(b'{"line": %d, "text": "the quick brown fox jumps over the lazy dog"}\n' % i for i in range(3000))


def encode(data: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data)
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise AssertionError(coding)


def test_capture_keeps_at_most_cap_bytes_and_hashes_everything() -> None:
    cap = BodyCapture(1000, content_encoding=" GZIP ", content_type="application/json")
    chunks = [os.urandom(n) for n in (10, 700, 0, 5000, 1)]
    for c in chunks:
        cap.feed(c)
    body = cap.finish()
    whole = b"".join(chunks)
    assert body.raw == whole[:1000]
    assert body.size == len(whole) and body.sha256 == hashlib.sha256(whole).hexdigest()
    assert body.cut and body.complete and body.encoding == "gzip" and body.mime_type == "application/json"
    with pytest.raises(RuntimeError):
        cap.feed(b"late")


def test_capture_of_a_small_body_is_whole_and_an_interrupted_one_says_so() -> None:
    body = capture_bytes(b"hello", 1000)
    assert body.raw == b"hello" and not body.cut
    cap = BodyCapture(0)
    cap.feed(b"abc")
    broken = cap.finish(complete=False)
    assert broken.raw == b"" and broken.size == 3 and not broken.complete


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "br", "zstd"])
def test_each_content_encoding_decodes(coding: str) -> None:
    out = decode_content(encode(TEXT, coding), coding, len(TEXT))
    assert out.data == TEXT and not out.cut


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decoding_stops_at_the_limit(coding: str) -> None:
    out = decode_content(encode(TEXT, coding), coding, 1000)
    assert out.data == TEXT[:1000] and out.cut


def test_raw_deflate_stacked_codings_and_gzip_members() -> None:
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw_deflate = raw.compress(TEXT) + raw.flush()
    assert decode_content(raw_deflate, "deflate", 1 << 20).data == TEXT
    stacked = brotli.compress(gzip.compress(TEXT))  # Content-Encoding: gzip, br
    assert decode_content(stacked, "gzip, br", 1 << 20).data == TEXT
    assert decode_content(TEXT, "identity", 1 << 20).data == TEXT
    two = gzip.compress(b"first ") + gzip.compress(b"second")
    assert decode_content(two, "gzip", 100).data == b"first second"


def test_a_cut_compressed_prefix_decodes_to_a_cut_prefix() -> None:
    z = encode(TEXT, "gzip")
    out = decode_content(z[: len(z) // 2], "gzip", 1 << 20)
    assert out.cut and 0 < len(out.data) < len(TEXT) and TEXT.startswith(out.data)


@pytest.mark.parametrize(("data", "coding"), [
    (b"plain text", "gzip"), (b"\x00" * 20, "br"), (b"nope", "zstd"), (b"xx", "compress"),
    (b"xx", "gzip, gzip, gzip, gzip"),
])
def test_bad_or_unknown_encodings_raise_decode_error(data: bytes, coding: str) -> None:
    with pytest.raises(DecodeError):
        decode_content(data, coding, 1000)


def test_pack_round_trip_and_unpack_refuses_more_than_recorded() -> None:
    assert unpack(pack(TEXT), len(TEXT)) == TEXT
    assert len(pack(TEXT)) < len(TEXT) // 5  # compressed at rest
    with pytest.raises(DecodeError):
        unpack(pack(TEXT), len(TEXT) - 1)  # a planted bomb in a tampered store stops at the recorded size
    with pytest.raises(DecodeError):
        unpack(b"garbage", 10)


BOMB_SCRIPT = textwrap.dedent("""
    import asyncio, json, resource, sys, zlib, brotli, zstandard
    from bastion.audit import AuditConfig, AuditRecord, AuditWriter, Identity, Request, Response, Timings
    from bastion.audit import capture_bytes, new_request_id, open_store

    ZERO = b"\\0" * (1 << 20)

    def bomb(coding):  # 1 GiB of zeros, compressed chunk by chunk (never 1 GiB in memory here either)
        c = {"gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
             "br": lambda: brotli.Compressor(quality=5),
             "zstd": lambda: zstandard.ZstdCompressor(level=3).compressobj()}[coding]()
        step = c.process if coding == "br" else c.compress
        out = [step(ZERO) for _ in range(1024)]
        out.append(c.finish() if coding == "br" else c.flush())
        return b"".join(out)

    async def main(db, spool):
        cfg = AuditConfig(max_body_bytes=1 << 20)
        writer = await AuditWriter.open(f"sqlite:///{db}", spool, config=cfg)
        sent = {}
        for coding in ("gzip", "br", "zstd"):
            data = bomb(coding)
            rec = AuditRecord(id=new_request_id(), started_us=1, ended_us=2,
                              identity=Identity("a", "pinned", "127.0.0.1:1"),
                              request=Request("GET", "http://127.0.0.1/bomb"), outcome="forwarded",
                              timings=Timings(total_us=1),
                              response=Response(200, "OK", headers=[("content-encoding", coding)]))
            body = capture_bytes(data, cfg.max_body_bytes, content_encoding=coding, content_type="text/plain")
            sent[rec.id] = (coding, len(data), body.sha256)
            assert writer.submit(rec, None, body)
            del data, body
        assert await writer.flush()
        await writer.close()
        out = {}
        async with open_store(f"sqlite:///{db}") as store:
            for rid, (coding, size, sha) in sent.items():
                r = await store.get(rid)
                b = r.response.body
                out[coding] = {"size": b.size, "sent_size": size, "sha_ok": b.sha256 == sha, "stored": b.stored,
                               "truncated": b.truncated, "zeros": b.content == bytes(len(b.content))}
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_decompression_bombs_are_stored_cut_with_bounded_memory(tmp_path: Path) -> None:
    """1 GiB of zeros as gzip (~1 MB), br and zstd goes through the real writer into SQLite in a fresh
    process; the process's peak memory must stay far below the bomb's decoded size."""
    script = tmp_path / "bomb.py"
    script.write_text(BOMB_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "a.db"), str(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for coding in ("gzip", "br", "zstd"):
        facts = out[coding]
        assert facts["size"] == facts["sent_size"] and facts["sha_ok"], coding
        assert facts["stored"] == 1 << 20 and facts["truncated"] and facts["zeros"], coding
    assert out["gzip"]["sent_size"] < 2 << 20  # it really was a ~1 MB bomb
    assert out["maxrss_mb"] < 300, out["maxrss_mb"]
