"""Owner-only files for everything that holds audit records, bodies, locks or approvals.

The audit database keeps full request and response bodies, so it deserves the same protection as the CA key:
mode 0600, whatever the umask. Two rules:

- Never a window with wider permissions: a new file is created here with `os.open(..., O_CREAT | O_EXCL,
  0o600)` *before* SQLite (or a writer) opens it. SQLite gives the `-wal`, `-shm` and `-journal` files it
  creates the main file's mode, so they are private too.
- A file left by an older version or created by hand with group or other bits is tightened (chmod, group and
  other bits dropped) when it is opened, with one warning per file and process, so the operator knows the
  mode changed. A file that cannot be tightened (owned by another user) is logged and left alone: refusing to
  start would turn a permission nit into an outage.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import IO

log = logging.getLogger("bastion")

FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_WARNED_MAX = 1024  # paths remembered for "warn once"; beyond that a warning may repeat, memory stays bounded
_warned: set[str] = set()
_warned_lock = threading.Lock()


def create_private(path: Path) -> bool:
    """Create `path` empty and owner-only unless it exists; True if this call created it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        return False
    return True


def tighten(path: Path) -> None:
    """Drop the group and other bits of an existing file or directory `path` (a missing one is fine), warning
    once per path."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    except OSError as e:
        log.warning("cannot check the permissions of %s: %s", path, e.strerror or e)
        return
    if not mode & 0o077:
        return
    private = mode & 0o700
    try:
        os.chmod(path, private)
    except OSError as e:
        _warn_once(path, "%s is readable by other users (mode %04o) and cannot be made private: %s",
                   path, mode, e.strerror or e)
        return
    _warn_once(path, "%s was readable by other users (mode %04o); changed to %04o", path, mode, private)


def prepare_sqlite(path: Path) -> None:
    """Make the database at `path` owner-only before SQLite opens it: create it 0600 when missing, else tighten
    it and any side files a previous run left behind."""
    if str(path) == ":memory:":
        return
    if not create_private(path):
        if not path.is_file():  # a directory, a device: SQLite will say what is wrong, nothing to chmod here
            return
        tighten(path)
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.is_file():
            tighten(side)


def open_private(path: Path, mode: str = "ab") -> IO[bytes]:
    """`open(path, mode)` for a binary write mode ("ab" or "wb"), the file owner-only before anything is
    written: created 0600, or (a leftover from an older version) narrowed through the open descriptor."""
    if mode not in ("ab", "wb"):
        raise ValueError(f"unsupported mode {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        current = stat.S_IMODE(os.fstat(fd).st_mode)
        if current & 0o077:
            os.fchmod(fd, current & 0o700)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def _warn_once(path: Path, message: str, *args: object) -> None:
    key = str(path)
    with _warned_lock:
        if key in _warned:
            return
        if len(_warned) < _WARNED_MAX:
            _warned.add(key)
    log.warning(message, *args)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the directory entry itself is data to sync)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
