"""Watch the rules files and reload when they change, by polling `stat` (no new dependency, works everywhere).

Polling survives what event-based watchers miss:

- Kubernetes ConfigMap updates: the mounted file is a symlink through `..data`, and an update swaps that
  symlink atomically. The file's own inode never changes; its *resolved* path and the target's stat do.
- Editors that save by writing a new file and renaming it over the old one (new inode).
- Files added to or removed from a rules directory (the directory listing is part of the fingerprint).

A change is acted on once it has settled (two polls agree), so a half-written file is not loaded. The stat
calls run in a worker thread: a slow or hung filesystem never stalls the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("bastion.policy")

Fingerprint = tuple[tuple[object, ...], ...]

_SUFFIXES = (".yaml", ".yml")


def _stat_entry(path: str) -> tuple[object, ...]:
    try:
        st = os.stat(path)  # follows symlinks: the content that would be read
    except OSError as e:
        return (path, "missing", e.errno)
    try:
        real = os.path.realpath(path)
    except OSError:
        real = path
    return (path, real, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """Everything about `paths` that changes when the rules they hold could change."""
    out: list[tuple[object, ...]] = []
    for p in paths:
        out.append(_stat_entry(p))
        if os.path.isdir(p):
            try:
                names = sorted(os.listdir(p))
            except OSError as e:
                out.append((p, "unlistable", e.errno))
                continue
            out.append((p, "names", tuple(names)))
            for name in names:
                if name.endswith(_SUFFIXES):
                    out.append(_stat_entry(os.path.join(p, name)))
    return tuple(out)


class RulesWatcher:
    """Polls `paths`; calls `on_change()` after a settled change. Run `run()` as a task; cancel to stop."""

    def __init__(
        self,
        paths: Sequence[str],
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = 0.5,
        settle: float = 0.2,
    ) -> None:
        self.paths = tuple(paths)
        self._on_change = on_change
        self.interval = interval
        self.settle = settle

    async def run(self) -> None:
        last = await asyncio.to_thread(fingerprint, self.paths)
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(fingerprint, self.paths)
            if current == last:
                continue
            while True:  # wait for the change to settle: editors and ConfigMap swaps take several steps
                await asyncio.sleep(self.settle)
                again = await asyncio.to_thread(fingerprint, self.paths)
                if again == current:
                    break
                current = again
            last = current
            log.info("rules changed on disk, reloading")
            try:
                await self._on_change()
            except Exception:  # a reload failure is reported by the reload itself; keep watching
                log.exception("reload after a rules change failed")


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel a background task and wait for it to finish (its cancellation is expected, not an error)."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
