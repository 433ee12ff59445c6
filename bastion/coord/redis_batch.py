"""Lua script calls that arrive together share one round trip to Redis.

A budgeted call runs one atomic script in Redis before it is forwarded (`RedisFleetStore.reserve`). Under
concurrency, each of those is a pool checkout, a socket write and a read on the event loop: about a quarter of
a millisecond of the loop's time per call, as much as a tenth of what the whole proxied call costs. Calls that
arrive while a round trip is in flight wait for it and then go together in one pipeline (not a transaction:
each script stays atomic on its own, as before, and none waits for another's keys), so the write, the read and
the checkout are paid once per batch. A lone call goes straight through, as before.

Pipelines send `EVALSHA`. A script Redis does not know (after a restart or `SCRIPT FLUSH`) answers NOSCRIPT;
that call is then made again on its own through redis-py's `Script`, which loads the script and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_BATCH = 64  # script calls per pipeline
MAX_QUEUED = 10_000  # calls waiting behind the round trip in flight (a memory bound); past it, refused at once

Call = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """`await batcher.call(script, keys, args)`: the script's reply, or the exception Redis raised for it."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._queued: list[Call] = []
        self._busy = False  # a round trip (a lone call or a batch) is in flight
        self._task: asyncio.Task[None] | None = None

    async def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        if not self._busy:
            # Nothing in flight: this call alone, the plain way; calls arriving meanwhile queue for a batch.
            self._busy = True
            try:
                return await script(keys=keys, args=args)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                self._fail_queued(e)  # the store just failed: the calls behind this one need not wait it out
                raise
            finally:
                self._busy = False
                self._start_drain()
        if len(self._queued) >= MAX_QUEUED:  # the store is not keeping up: refuse now, not after the queue
            raise ConnectionError(f"{len(self._queued)} calls already wait for the store")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((script, keys, args, done))
        return await done

    def _start_drain(self) -> None:
        if self._queued and not self._busy:
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="redis-script-batch")

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                await self._run(batch)
        finally:
            self._busy = False
            self._task = None
            self._start_drain()  # calls queued after a cancellation

    async def _run(self, batch: list[Call]) -> None:
        """One pipeline for the batch. Whatever happens (a dead connection, the store closing, a caller going
        away mid-retry), every call of the batch is answered before this returns or raises."""
        try:
            pipe = self._client.pipeline(transaction=False)
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            for (script, keys, args, done), reply in zip(batch, replies, strict=True):
                if isinstance(reply, NoScriptError) and not done.done():
                    try:
                        reply = await script(keys=keys, args=args)  # loads the script, then runs it
                    except Exception as e:
                        reply = e
                if done.done():  # its caller went away; the script itself ran
                    continue
                if isinstance(reply, Exception):
                    done.set_exception(reply)
                else:
                    done.set_result(reply)
        except BaseException as e:  # the connection, not one script (or closing): the rest of the batch gets it
            error = e if isinstance(e, Exception) else ConnectionError("the store was closed")
            # So do the calls queued behind it: the store just failed, and making each batch wait out its own
            # timeout in turn would keep the last caller waiting for minutes before it is refused.
            for *_, done in batch:
                if not done.done():
                    done.set_exception(error)
            self._fail_queued(error)
            if not isinstance(e, Exception):
                raise

    def _fail_queued(self, error: BaseException) -> None:
        waiting, self._queued = self._queued, []
        for *_, done in waiting:
            if not done.done():
                done.set_exception(error)

    async def close(self) -> None:
        """Fail what still waits; a batch in flight is cancelled (its scripts may or may not have run)."""
        queued, self._queued = self._queued, []
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for *_, done in queued + self._queued:
            if not done.done():
                done.set_exception(ConnectionError("the store was closed"))
        self._queued.clear()
