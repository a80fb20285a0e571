"""The idempotency barrier on PostgreSQL (psycopg 3, sync and async):
exactly-once effects for handlers whose work is in PostgreSQL.

The same table and rules as the Rust SDK's barrier (``saga_barrier``), so
services in both languages can share one database:

- a duplicate action or compensation (a retry, a redelivery after a
  coordinator crash, two racing calls) has no second effect, and a duplicate
  action returns the first result;
- a compensation whose action never ran succeeds as a no-op and is recorded
  (*null compensation*);
- an action that arrives after its compensation is refused as a business
  failure (:class:`~saga_sdk.Refused`): no *hanging* reservation;
- a refusal (``Refused`` raised by ``fn``) undoes ``fn``'s work but is
  recorded with the attempt that refused: an attempt up to that one
  arriving later gets the same refusal without running ``fn``; a later
  attempt (an operator's retry) runs ``fn`` again; a compensation finds
  nothing to undo and marks the action 'skipped'.

::

  action:        insert action row 'done' --inserted--> savepoint, run fn(conn):
                        |                                 ok: store output, commit
                        |                                 Refused: undo to the savepoint,
                        |                                   row 'refused' + reason, commit
                        | conflict (waits for a racing twin to finish)
                        +- 'done'    -> return the stored output (no second effect)
                        +- 'refused' -> the same refusal (a later attempt: run fn again)
                        +- 'skipped' -> Refused: compensated before it arrived
  compensation:  insert compensation row --conflict--> duplicate: done, no effect
                        | inserted
                 insert action row 'skipped' --inserted--> null compensation: commit
                        | conflict: the action ran, or refused (then: 'skipped', null compensation)
                        +-> run fn(conn), commit

Each call opens its own connection (``conninfo``) and runs the handler's
``fn`` inside the barrier's transaction: the handler's SQL must run on the
connection it is given, so it commits or rolls back with the record.
"""

from __future__ import annotations

import json
from datetime import timedelta
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

import psycopg

from .client import to_json
from .participant import Phase, Refused, StepContext, Unknown

T = TypeVar("T")

#: The barrier table's DDL (``CREATE TABLE IF NOT EXISTS``), shared with the
#: Rust SDK.
MIGRATION: str = (resources.files("saga_sdk") / "migrations" / "0001_saga_barrier.sql").read_text()

_MARK = """INSERT INTO saga_barrier (saga_id, step, phase, state) VALUES (%s, %s, %s, %s)
           ON CONFLICT DO NOTHING"""
_READ = """SELECT state, output FROM saga_barrier
           WHERE saga_id = %s AND step = %s AND phase = 'action' FOR UPDATE"""
_SKIP_REFUSED = """UPDATE saga_barrier SET state = 'skipped'
                   WHERE saga_id = %s AND step = %s AND phase = 'action' AND state = 'refused'"""
_STORE = """UPDATE saga_barrier SET state = %s, output = %s
            WHERE saga_id = %s AND step = %s AND phase = 'action'"""


def _expect(ctx: StepContext, phase: Phase) -> None:
    if ctx.phase is not phase:
        raise Unknown(f"barrier {phase.value} called from a {ctx.phase.value} handler")


def _replay(ctx: StepContext, state: str, output: str | None) -> Any:
    """What a duplicate action answers."""
    if state == "skipped":
        raise Refused(
            f"step {ctx.step!r} of saga {ctx.saga_id} was compensated before its action arrived"
        )
    if state == "refused":
        raise Refused(_refusal(output)[0])
    return json.loads(output) if output is not None else None


def _refusal(output: str | None) -> tuple[str, int]:
    """A recorded refusal: why, and the attempt that refused (anything else
    binds every attempt)."""
    try:
        v = json.loads(output) if output is not None else {}
    except ValueError:
        v = {}
    if not isinstance(v, dict):
        v = {}
    reason, attempt = v.get("reason"), v.get("attempt")
    return (
        reason if isinstance(reason, str) else "refused",
        attempt if isinstance(attempt, int) else 2**32,
    )


def _retried(ctx: StepContext, state: str, output: str | None) -> bool:
    """A later attempt than the one that refused: an operator's retry, which
    runs the handler again."""
    return state == "refused" and ctx.attempt > _refusal(output)[1]


def _refusal_record(ctx: StepContext, e: Refused) -> str:
    return json.dumps({"reason": str(e), "attempt": ctx.attempt})


_PURGE = (
    "DELETE FROM saga_barrier WHERE ctid IN ("
    " SELECT ctid FROM saga_barrier WHERE created_at < now() - %s LIMIT %s)"
)


class Barrier:
    """The barrier over blocking psycopg connections."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as e:
            raise Unknown(f"database: {e}") from None

    def create_table(self) -> None:
        """Creates the barrier table if it does not exist."""
        with self._connect() as conn:
            conn.execute(MIGRATION.encode())

    def purge_older_than(self, age: timedelta, batch: int = 500) -> int:
        """Deletes barrier records older than ``age`` in batches of ``batch``
        rows; returns how many. ``age`` must be longer than any saga may
        still call this service: at least the coordinator's
        ``--retention-days`` plus the longest a saga may run."""
        total = 0
        with self._connect() as conn:
            while True:
                n = conn.execute(_PURGE, (age, max(batch, 1))).rowcount
                total += n
                if n < max(batch, 1):
                    return total

    def action(self, ctx: StepContext, fn: Callable[[psycopg.Connection[Any]], T]) -> Any:
        """Runs an action's database work ``fn`` at most once per saga step;
        returns its result, or the first result to a duplicate."""
        _expect(ctx, Phase.ACTION)
        saga = str(ctx.saga_id)
        with self._connect() as conn, conn.transaction():
            cur = conn.execute(_MARK, (saga, ctx.step, "action", "done"))
            if cur.rowcount != 1:
                row = conn.execute(_READ, (saga, ctx.step)).fetchone()
                if row is None:
                    raise Unknown("barrier record vanished")
                if not _retried(ctx, row[0], row[1]):
                    return _replay(ctx, row[0], row[1])
            try:
                # A savepoint: a refusal undoes fn's work, keeps the record.
                with conn.transaction():
                    value = fn(conn)
            except Refused as e:
                conn.execute(_STORE, ("refused", _refusal_record(ctx, e), saga, ctx.step))
                refused = e
            else:
                conn.execute(_STORE, ("done", to_json(value), saga, ctx.step))
                return value
        raise refused

    def compensation(self, ctx: StepContext, fn: Callable[[psycopg.Connection[Any]], None]) -> None:
        """Runs a compensation's database work ``fn`` at most once per saga
        step, and only if the action took effect here; otherwise records a
        null compensation."""
        _expect(ctx, Phase.COMPENSATION)
        saga = str(ctx.saga_id)
        with self._connect() as conn, conn.transaction():
            first = conn.execute(_MARK, (saga, ctx.step, "compensation", "done")).rowcount == 1
            if not first:
                return
            # Waits while a racing action holds its row, then either sees it
            # (the action ran: compensate it) or plants 'skipped'.
            null = conn.execute(_MARK, (saga, ctx.step, "action", "skipped")).rowcount == 1
            if not null:
                # A refused action: nothing to undo; no attempt may run it now.
                null = conn.execute(_SKIP_REFUSED, (saga, ctx.step)).rowcount == 1
            if not null:
                fn(conn)


class AsyncBarrier:
    """The barrier over asyncio psycopg connections."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as e:
            raise Unknown(f"database: {e}") from None

    async def create_table(self) -> None:
        """Creates the barrier table if it does not exist."""
        async with await self._connect() as conn:
            await conn.execute(MIGRATION.encode())

    async def purge_older_than(self, age: timedelta, batch: int = 500) -> int:
        """As :meth:`Barrier.purge_older_than`."""
        total = 0
        async with await self._connect() as conn:
            while True:
                n = (await conn.execute(_PURGE, (age, max(batch, 1)))).rowcount
                total += n
                if n < max(batch, 1):
                    return total

    async def action(
        self, ctx: StepContext, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
    ) -> Any:
        """As :meth:`Barrier.action`, with an async ``fn``."""
        _expect(ctx, Phase.ACTION)
        saga = str(ctx.saga_id)
        async with await self._connect() as conn, conn.transaction():
            cur = await conn.execute(_MARK, (saga, ctx.step, "action", "done"))
            if cur.rowcount != 1:
                row = await (await conn.execute(_READ, (saga, ctx.step))).fetchone()
                if row is None:
                    raise Unknown("barrier record vanished")
                if not _retried(ctx, row[0], row[1]):
                    return _replay(ctx, row[0], row[1])
            try:
                async with conn.transaction():
                    value = await fn(conn)
            except Refused as e:
                await conn.execute(_STORE, ("refused", _refusal_record(ctx, e), saga, ctx.step))
                refused = e
            else:
                await conn.execute(_STORE, ("done", to_json(value), saga, ctx.step))
                return value
        raise refused

    async def compensation(
        self, ctx: StepContext, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]
    ) -> None:
        """As :meth:`Barrier.compensation`, with an async ``fn``."""
        _expect(ctx, Phase.COMPENSATION)
        saga = str(ctx.saga_id)
        async with await self._connect() as conn, conn.transaction():
            cur = await conn.execute(_MARK, (saga, ctx.step, "compensation", "done"))
            if cur.rowcount != 1:
                return
            cur = await conn.execute(_MARK, (saga, ctx.step, "action", "skipped"))
            null = cur.rowcount == 1
            if not null:
                null = (await conn.execute(_SKIP_REFUSED, (saga, ctx.step))).rowcount == 1
            if not null:
                await fn(conn)
