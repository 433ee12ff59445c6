"""Signed checkpoints of the audit hash chains: what lets `verify` see a cut-off or rewritten tail.

A hash chain proves that its records follow one another, not that nothing came after the last one it holds:
delete a writer's newest records, or replace them with others linked properly (hashes recomputed), and the
chain still looks whole. So each writer (the audit worker of one spool) regularly signs its head, `(writer,
seq, hash of record seq, time, key id, sink)`, with an Ed25519 key kept under `--home`, and leaves the signed
checkpoint outside the audit database: in the shared store (`bastion.coord.witness`, where `verify` finds it
from any machine with `--store`) and in its spool directory (`checkpoint.json`). `verify` then requires the
audit store to hold, at each checkpoint's seq, the very record the writer signed, and a chain at least that long.

What is signed: only the drain's head, after `store.write` returned, never records that are merely spooled:
a spooled record may still never reach the sink (an unreadable stretch of spool is skipped), and a checkpoint
must never claim a seq the audit database will not have. When: right after the first drain of a run, then
after every `EVERY_RECORDS` records or `EVERY_SECONDS`, whichever comes first, and once at a clean shutdown.
Records drained after the last checkpoint (a killed worker, or the last seconds before an attack) are not
covered: that window is the limit of the scheme.

Keys: `<home>/audit-signing.key` (PKCS#8 PEM, created 0600 with O_EXCL and linked into place, so it is never
readable by others, not even briefly, and two workers starting together end up with the same key);
`<home>/audit-signing.pub` holds the public half as one line (`ed25519 BASE64 COMMENT`, the `--keys` format),
and every checkpoint written to the store registers it there too. Trust is the verifier's choice: keys pinned
with `--keys` (or found under the local `--home`) resist anyone who can write the store and the audit database
without holding the key; keys taken from the store are trusted on first use, which resists only someone who
cannot write the store. Whoever holds the key, the store and the database can rewrite everything, and whoever
owns the store can roll the checkpoints back to an older, validly signed one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.audit.chain import ChainHead
from bastion.coord.witness import MAX_DOCUMENT, CheckpointWitness, WitnessEntry, open_witness, valid_writer_id
from bastion.private_files import fsync_dir

if TYPE_CHECKING:
    from bastion.audit.writer import AuditWriter

log = logging.getLogger("bastion.audit")

EVERY_RECORDS = 1000
"""A checkpoint at least every this many drained records..."""
EVERY_SECONDS = 60.0
"""...and at least this often (seconds) while records are drained."""
RETRY_SECONDS = 5.0
"""After a failed checkpoint write (store down), try again this much later."""
STORE_TIMEOUT = 5.0
"""Longest a checkpoint write to the store may take (seconds)."""
CLOSE_TIMEOUT = 5.0
"""Longest the final checkpoint at shutdown may take (seconds)."""

KEY_FILE = "audit-signing.key"
PUB_FILE = "audit-signing.pub"
LOCAL_FILE = "checkpoint.json"
"""The newest checkpoint, in the writer's spool directory."""

MAX_KEY_FILE = 64 << 10
MAX_KEYS_FILE = 1 << 20
_DOMAIN = b"bastion audit checkpoint v1\n"
_HASH = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_MAX_SEQ = 1 << 62
_MAX_SINK = 1024


class CheckpointError(ValueError):
    """A key, key file or checkpoint document Bastion cannot use. The message says which and why."""


def stamp(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- keys -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key; `key_id` (16 hex digits of its SHA-256) is what checkpoints name."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def line(self, comment: str = "") -> str:
        """The key as one line of a `--keys` file."""
        text = f"ed25519 {base64.b64encode(self.raw).decode()}"
        return f"{text} {comment}".rstrip() if comment else text

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_key_line(line: str) -> PublicKey:
    """`ed25519 BASE64 [comment]` -> PublicKey. Raises CheckpointError."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ed25519":
        raise CheckpointError("expected 'ed25519 BASE64 [comment]'")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise CheckpointError("the key is not base64") from None
    if len(raw) != 32:
        raise CheckpointError(f"an Ed25519 key has 32 bytes, this one {len(raw)}")
    return PublicKey(raw)


def read_keys_file(path: Path) -> list[PublicKey]:
    """The keys of a `--keys` file: one `ed25519 BASE64 [comment]` a line; blank lines and `#` comments ignored."""
    with path.open("rb") as f:
        data = f.read(MAX_KEYS_FILE + 1)
    if len(data) > MAX_KEYS_FILE:
        raise CheckpointError(f"{path}: larger than {MAX_KEYS_FILE} bytes")
    keys = []
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                keys.append(parse_key_line(line))
            except CheckpointError as e:
                raise CheckpointError(f"{path}, line {n}: {e}") from None
    if not keys:
        raise CheckpointError(f"{path}: no keys in it")
    return keys


@dataclass(frozen=True, slots=True)
class SigningKey:
    private: Ed25519PrivateKey
    public: PublicKey

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def _load_private(path: Path) -> SigningKey:
    with path.open("rb") as f:
        data = f.read(MAX_KEY_FILE + 1)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path}: not an Ed25519 key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(key, PublicKey(raw))


def home_public_key(home: Path) -> PublicKey | None:
    """The public key of `<home>/audit-signing.key` (from `.pub` when the private file cannot be read), or None."""
    try:
        return _load_private(home / KEY_FILE).public
    except FileNotFoundError:
        pass
    except PermissionError:
        with contextlib.suppress(FileNotFoundError):
            return parse_key_line((home / PUB_FILE).read_text(errors="replace")[:MAX_KEY_FILE])
    return None


def key_comment(home: Path) -> str:
    return f"{socket.gethostname()}:{home}".replace(" ", "_")


def load_or_create_key(home: Path) -> SigningKey:
    """The home's signing key, created on first use. Blocking: call on a thread.

    Created in a private temporary file (O_EXCL, mode 0600 from the start) that is then hard-linked to its name:
    the link fails if another worker got there first, and that worker's key is used instead."""
    path = home / KEY_FILE
    try:
        key = _load_private(path)
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; restricting it to its owner", path)
            path.chmod(0o600)
    except FileNotFoundError:
        key = _create_key(home, path)
    _write_public(home, key.public)
    return key


def _create_key(home: Path, path: Path) -> SigningKey:
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    tmp = _write_new(home / KEY_FILE, pem, 0o600)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: rename, which cannot refuse to replace
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(home)
    key = _load_private(path)
    log.info("audit: created the checkpoint signing key %s (key id %s)", path, key.public.key_id)
    return key


def _write_public(home: Path, public: PublicKey) -> None:
    path = home / PUB_FILE
    line = public.line(key_comment(home)) + "\n"
    with contextlib.suppress(OSError):
        if path.read_text() == line:
            return
    _atomic_write(path, line.encode(), mode=0o644)


def _write_new(path: Path, data: bytes, mode: int) -> Path:
    """A synced temporary file beside `path`, created with `mode` (never wider, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    tmp = _write_new(path, data, mode)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


# --- checkpoints ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Writer `writer` had drained records 1..`seq` into `sink`, record `seq` hashing to `hash`, at `time_us`;
    signed with key `key_id`."""

    writer: str
    seq: int
    hash: str
    time_us: int
    key_id: str
    sink: str
    signature: bytes = b""

    def payload(self) -> bytes:
        """The signed bytes: a domain tag, then the fields as canonical JSON."""
        fields = {"v": 1, "writer": self.writer, "seq": self.seq, "hash": self.hash, "time_us": self.time_us,
                  "key": self.key_id, "sink": self.sink}
        return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def document(self) -> str:
        return json.dumps({"v": 1, "writer": self.writer, "seq": self.seq, "hash": self.hash,
                           "time_us": self.time_us, "key": self.key_id, "sink": self.sink,
                           "sig": base64.b64encode(self.signature).decode()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """A document as `document` writes it, every field checked. Raises CheckpointError."""
        if len(text) > MAX_DOCUMENT:
            raise CheckpointError("the document is too long")
        try:
            d = json.loads(text)
        except ValueError:
            raise CheckpointError("the document is not JSON") from None
        keys = {"v", "writer", "seq", "hash", "time_us", "key", "sink", "sig"}
        if not isinstance(d, dict) or set(d) != keys or d["v"] != 1:
            raise CheckpointError("the document does not have the fields of a checkpoint")
        seq, time_us = d["seq"], d["time_us"]
        if not (isinstance(d["writer"], str) and valid_writer_id(d["writer"]) and _int(seq) and 1 <= seq <= _MAX_SEQ
                and isinstance(d["hash"], str) and _HASH.fullmatch(d["hash"]) and _int(time_us) and time_us >= 0
                and isinstance(d["key"], str) and _KEY_ID.fullmatch(d["key"])
                and isinstance(d["sink"], str) and len(d["sink"]) <= _MAX_SINK and isinstance(d["sig"], str)):
            raise CheckpointError("a field of the checkpoint has a bad value")
        try:
            signature = base64.b64decode(d["sig"], validate=True)
        except ValueError:
            raise CheckpointError("the signature is not base64") from None
        return cls(d["writer"], seq, d["hash"], time_us, d["key"], d["sink"], signature)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sign_checkpoint(key: SigningKey, head: ChainHead, sink: str, *, time_us: int | None = None) -> Checkpoint:
    now = time.time_ns() // 1000 if time_us is None else time_us
    unsigned = Checkpoint(head.writer, head.seq, head.hash, now, key.public.key_id, sink)
    return Checkpoint(head.writer, head.seq, head.hash, now, key.public.key_id, sink, key.sign(unsigned.payload()))


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A key `verify` accepts signatures from; `source` says where it was found. `pinned`: given by the operator
    (`--keys`) or found under the local `--home`; not pinned: taken from the store (trusted on first use)."""

    key: PublicKey
    source: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class Witnessed:
    """One checkpoint document as found: `source` names where; `writer` is the writer the store filed it under
    (None for a spool's own file, which speaks for whichever writer it names)."""

    writer: str | None
    source: str
    document: str


@dataclass(frozen=True, slots=True)
class Judged:
    """A witnessed document after checking: `checkpoint` when it parsed (signed or not), `fault` what is wrong
    (None: a valid signature by a trusted key)."""

    witnessed: Witnessed
    checkpoint: Checkpoint | None
    fault: str | None


def judge(w: Witnessed, trusted: Mapping[str, TrustedKey]) -> Judged:
    """Is `w` a checkpoint signed by a trusted key, for the writer it is filed under?"""
    try:
        cp = Checkpoint.parse(w.document)
    except CheckpointError as e:
        return Judged(w, None, f"a checkpoint in {w.source} is unreadable ({e}): forged or damaged")
    what = f"checkpoint #{cp.seq} of writer {cp.writer} ({w.source}, {stamp(cp.time_us)})"
    if w.writer is not None and cp.writer != w.writer:
        return Judged(w, cp, f"{what} is filed under writer {w.writer}: moved or forged")
    tk = trusted.get(cp.key_id)
    if tk is None:
        return Judged(w, cp, f"{what} is signed by key {cp.key_id}, which is not trusted: forged, or pass that "
                      "writer's key with --keys")
    if not tk.key.verifies(cp.signature, cp.payload()):
        return Judged(w, cp, f"{what} does not carry a valid signature of key {cp.key_id}: forged or edited")
    return Judged(w, cp, None)


# --- the writer's side: the audit worker ------------------------------------------------------------------------

class Checkpointer:
    """Signs the drain's head and writes it to the spool directory and the store; see the module docstring.

    `note(head)` is the writer's drain callback (event loop, O(1)); `start()` runs the loop as a task; `close()`
    stops it and writes the last checkpoint, bounded by `CLOSE_TIMEOUT`."""

    def __init__(self, key: SigningKey, sink: str, local: Path, witness: CheckpointWitness | None, *,
                 every_records: int = EVERY_RECORDS, every_seconds: float = EVERY_SECONDS,
                 key_line: str | None = None) -> None:
        self._key = key
        self._key_line = key_line or key.public.line()
        self._sink = sink
        self._local = local
        self._witness = witness
        self._every_records = every_records
        self._every_seconds = every_seconds
        self._head: ChainHead | None = None
        self._done: ChainHead | None = None  # the last head checkpointed everywhere
        self._done_at = 0.0
        self._retry_at = 0.0
        self._failing_since = 0.0
        self._last_log = 0.0
        self._wake = asyncio.Event()
        self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-checkpoint")
        self._task: asyncio.Task[None] | None = None

    def note(self, head: ChainHead) -> None:
        """The sink now holds records up to `head`."""
        current = self._head
        if current is None or head.writer != current.writer or head.seq > current.seq:
            self._head = head
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-checkpoints")

    async def close(self, *, within: float = CLOSE_TIMEOUT) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._head is not None and self._head != self._done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._publish()
        if self._witness is not None:
            try:
                async with asyncio.timeout(within):
                    await self._witness.close()
            except Exception as e:  # a hung store must not stop the shutdown
                log.warning("audit checkpoints: error while closing %s: %s", self._witness.where, e)
        self._files.shutdown(wait=False)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = self._delay(time.monotonic())
            if delay is not None and delay <= 0:
                try:
                    await self._publish()
                except Exception:  # a bug here must not end checkpointing for the rest of the run
                    log.exception("audit checkpoint failed")
                    self._retry_at = time.monotonic() + RETRY_SECONDS
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _delay(self, now: float) -> float | None:
        """Seconds until the next checkpoint is due; None while there is nothing new to sign."""
        head, done = self._head, self._done
        if head is None or head == done:
            return None
        if now < self._retry_at:
            return self._retry_at - now
        if done is None or head.writer != done.writer or head.seq - done.seq >= self._every_records:
            return 0.0
        return self._done_at + self._every_seconds - now

    async def _publish(self) -> None:
        head = self._head
        assert head is not None
        cp = sign_checkpoint(self._key, head, self._sink)
        doc = cp.document()
        problems = []
        try:
            await asyncio.get_running_loop().run_in_executor(self._files, _atomic_write, self._local, doc.encode())
        except OSError as e:
            problems.append(f"cannot write {self._local}: {e.strerror or e}")
        if self._witness is not None:
            try:
                async with asyncio.timeout(STORE_TIMEOUT):
                    await self._witness.put(head.writer, head.seq, cp.time_us, doc, self._key_line)
            except Exception as e:  # store down, slow, or refusing: the records are safe, retry later
                problems.append(f"cannot write to {self._witness.where}: {e or type(e).__name__}")
        now = time.monotonic()
        if problems:
            self._retry_at = now + RETRY_SECONDS
            if not self._failing_since or now - self._last_log >= 60.0:
                log.warning("audit checkpoint #%d of writer %s: %s; retrying", head.seq, head.writer,
                            "; ".join(problems))
                self._last_log = now
            self._failing_since = self._failing_since or now
            return
        if self._failing_since:
            log.warning("audit checkpoints are written again (writer %s, #%d)", head.writer, head.seq)
            self._failing_since = 0.0
        self._done, self._done_at = head, now


async def start_checkpoints(home: Path, writer: AuditWriter, store_url: str | None) -> Checkpointer | None:
    """The worker's checkpointer, hooked to `writer`'s drain and started; None (logged) without a usable key.

    The checkpoints are witnessed in the shared store (`store_url`, from `bastion serve`'s HELLO; None: the
    home's default store). Audit itself goes on without checkpoints when they cannot be had: records matter
    more than their seal."""
    try:
        return await _start_checkpoints(home, writer, store_url)
    except Exception:
        log.exception("audit checkpoints disabled: they could not be set up")
        return None


async def _start_checkpoints(home: Path, writer: AuditWriter, store_url: str | None) -> Checkpointer | None:
    from bastion.audit.spool import read_cursor_file
    from bastion.config import Home, resolve_store
    from bastion.coord.store import StoreURLError

    if store_url is None:
        store_url = resolve_store(None, Home(home))

    try:
        key = await asyncio.to_thread(load_or_create_key, home)
    except (OSError, CheckpointError) as e:
        log.error("audit checkpoints disabled: cannot use the signing key under %s: %s", home, e)
        return None
    witness: CheckpointWitness | None = None
    try:
        witness = open_witness(store_url, create=True)
    except StoreURLError as e:
        log.error("audit checkpoints are kept in the spool only: %s", e)
    sink = writer.store.display_url
    cp = Checkpointer(key, sink, writer.spool_directory / LOCAL_FILE, witness, key_line=key.public.line(
        key_comment(home)))
    writer.on_drained = cp.note
    cursor = await asyncio.to_thread(read_cursor_file, writer.spool_directory)
    drained = writer.drained_head
    if drained is not None and drained.seq > 0 and cursor is not None and cursor.sink == sink:
        cp.note(drained)  # what earlier runs drained into this sink: sealed at once
    cp.start()
    return cp


# --- the verifier's side ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class Evidence:
    """What `verify` holds the chains against: the checkpoints found and the keys trusted."""

    witnessed: list[Witnessed]
    trusted: dict[str, TrustedKey]
    store: str


async def gather_evidence(home: Path, store_url: str, keys_file: Path | None) -> Evidence:
    """Checkpoints from the store at `store_url` and from the spool directories under `home`; trusted keys from
    `keys_file`, or else from `home` and the store. Raises CheckpointError (bad --keys, unusable key file),
    StoreURLError and StoreUnavailable."""
    witness = open_witness(store_url, create=False)
    try:
        entries = await witness.read()
    finally:
        await witness.close()
    where = witness.where
    found = [Witnessed(e.writer, f"the store {where}", doc) for e in entries for doc in e.documents]
    found += await asyncio.to_thread(_local_checkpoints, home)
    trusted: dict[str, TrustedKey] = {}
    if keys_file is not None:
        for key in await asyncio.to_thread(read_keys_file, keys_file):
            trusted.setdefault(key.key_id, TrustedKey(key, f"--keys {keys_file}", True))
        return Evidence(found, trusted, where)
    local = await asyncio.to_thread(home_public_key, home)
    if local is not None:
        trusted[local.key_id] = TrustedKey(local, f"--home {home / KEY_FILE}", True)
    for key in _store_keys(entries):
        trusted.setdefault(key.key_id, TrustedKey(key, f"the store {where}", False))
    return Evidence(found, trusted, where)


def _store_keys(entries: list[WitnessEntry]) -> list[PublicKey]:
    keys = []
    for e in entries:
        if e.key_line is not None:
            with contextlib.suppress(CheckpointError):
                keys.append(parse_key_line(e.key_line))
    return keys


def _local_checkpoints(home: Path) -> list[Witnessed]:
    from bastion.audit.spool import SPOOL_SLOTS, spool_slot

    found = []
    for index in range(SPOOL_SLOTS):
        spool = spool_slot(home, index)
        try:
            with (spool / LOCAL_FILE).open(encoding="utf-8", errors="replace") as f:
                document = f.read(MAX_DOCUMENT + 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.append(Witnessed(None, f"--home {spool / LOCAL_FILE}", document))
    return found
