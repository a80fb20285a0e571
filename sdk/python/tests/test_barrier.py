"""The barrier on PostgreSQL, sync and async: duplicates, null
compensations, no hanging, racing duplicates on two connections; the table
is the Rust SDK's."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from saga_sdk import Phase, Refused, StepContext
from saga_sdk.barrier import MIGRATION, AsyncBarrier, Barrier

ROOT = pathlib.Path(__file__).resolve().parents[3]


def ctx(saga: uuid.UUID, phase: Phase, attempt: int = 1) -> StepContext:
    return StepContext(
        saga_id=saga,
        definition="d",
        step="book",
        phase=phase,
        handler="h",
        attempt=attempt,
        idempotency_key=f"{saga}/book/{phase.value}",
        input_json="{}",
    )


@pytest.fixture
def db(data_db: str) -> str:
    Barrier(data_db).create_table()
    with psycopg.connect(data_db, autocommit=True) as c:
        c.execute("CREATE TABLE effects (saga_id text, what text)")
    return data_db


def effects(db: str) -> list[tuple[str, str]]:
    with psycopg.connect(db) as c:
        return [(r[0], r[1]) for r in c.execute("SELECT saga_id, what FROM effects ORDER BY what").fetchall()]


def test_the_table_is_the_rust_sdks() -> None:
    rust = (ROOT / "sdk" / "rust" / "migrations" / "0001_saga_barrier.sql").read_text()
    assert MIGRATION == rust


def test_duplicates_null_compensation_and_no_hanging(db: str) -> None:
    b = Barrier(db)
    saga = uuid.uuid4()

    def book(conn: psycopg.Connection[Any]) -> dict[str, str]:
        conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        return {"ref": "R-1"}

    assert b.action(ctx(saga, Phase.ACTION), book) == {"ref": "R-1"}
    assert b.action(ctx(saga, Phase.ACTION, attempt=2), book) == {"ref": "R-1"}
    assert effects(db) == [(str(saga), "booked")]

    def cancel(conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO effects VALUES (%s, 'cancelled')", (str(saga),))

    b.compensation(ctx(saga, Phase.COMPENSATION), cancel)
    b.compensation(ctx(saga, Phase.COMPENSATION, attempt=2), cancel)
    assert effects(db) == [(str(saga), "booked"), (str(saga), "cancelled")]

    # A compensation that arrives first is a recorded no-op; the action that
    # arrives after it is refused (no hanging booking).
    other = uuid.uuid4()
    b.compensation(ctx(other, Phase.COMPENSATION), cancel)
    with pytest.raises(Refused):
        b.action(ctx(other, Phase.ACTION), book)
    assert [e for e in effects(db) if e[0] == str(other)] == []
    with psycopg.connect(db) as c:
        rows = c.execute(
            "SELECT phase, state FROM saga_barrier WHERE saga_id = %s ORDER BY phase", (str(other),)
        ).fetchall()
    assert rows == [("action", "skipped"), ("compensation", "done")]

    # A handler error rolls its work and the record back: the retry runs.
    third = uuid.uuid4()

    def fails(conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO effects VALUES (%s, 'half')", (str(third),))
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        b.action(ctx(third, Phase.ACTION), fails)
    assert b.action(ctx(third, Phase.ACTION, 2), lambda conn: "second") == "second"
    assert [e for e in effects(db) if e[0] == str(third)] == []


def test_a_refusal_is_recorded_for_late_attempts_and_compensates_nothing(db: str) -> None:
    b = Barrier(db)
    saga = uuid.uuid4()

    def refuses(conn: psycopg.Connection[Any]) -> str:
        conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        raise Refused("insufficient funds")

    with pytest.raises(Refused, match="insufficient funds"):
        b.action(ctx(saga, Phase.ACTION, attempt=2), refuses)
    assert effects(db) == [], "the refused work is undone"
    # An earlier attempt arriving late (it hung before the barrier) gets the
    # same refusal without running.
    with pytest.raises(Refused, match="insufficient funds"):
        b.action(ctx(saga, Phase.ACTION, attempt=1), lambda conn: "booked")

    def cancel(conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO effects VALUES (%s, 'cancelled')", (str(saga),))

    b.compensation(ctx(saga, Phase.COMPENSATION), cancel)
    assert effects(db) == [], "nothing to undo"
    # Compensated: not even a later attempt runs it now.
    with pytest.raises(Refused):
        b.action(ctx(saga, Phase.ACTION, attempt=3), lambda conn: "booked")


def test_a_later_attempt_than_the_refusing_one_runs_again(db: str) -> None:
    b = Barrier(db)
    saga = uuid.uuid4()

    def refuses(conn: psycopg.Connection[Any]) -> str:
        raise Refused("account frozen")

    def books(conn: psycopg.Connection[Any]) -> str:
        conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        return "R-7"

    with pytest.raises(Refused):
        b.action(ctx(saga, Phase.ACTION), refuses)
    # An operator's retry after the account was unfrozen: attempt 2 runs.
    assert b.action(ctx(saga, Phase.ACTION, attempt=2), books) == "R-7"
    # A late arrival of attempt 1 gets the stored result, no second effect.
    assert b.action(ctx(saga, Phase.ACTION), books) == "R-7"
    assert effects(db) == [(str(saga), "booked")]


async def test_async_refusal_is_recorded(db: str) -> None:
    b = AsyncBarrier(db)
    saga = uuid.uuid4()

    async def refuses(conn: psycopg.AsyncConnection[Any]) -> str:
        await conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        raise Refused("card declined")

    async def books(conn: psycopg.AsyncConnection[Any]) -> str:
        await conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        return "booked"

    async def cancel(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("INSERT INTO effects VALUES (%s, 'cancelled')", (str(saga),))

    with pytest.raises(Refused, match="card declined"):
        await b.action(ctx(saga, Phase.ACTION, attempt=2), refuses)
    with pytest.raises(Refused, match="card declined"):
        await b.action(ctx(saga, Phase.ACTION, attempt=1), books)
    await b.compensation(ctx(saga, Phase.COMPENSATION), cancel)
    assert effects(db) == []
    with pytest.raises(Refused):
        await b.action(ctx(saga, Phase.ACTION, attempt=3), books)
    assert effects(db) == []


def test_racing_duplicates_on_two_connections_have_one_effect(db: str) -> None:
    b = Barrier(db)
    saga = uuid.uuid4()
    both = threading.Barrier(2)
    results: list[Any] = []

    def book(conn: psycopg.Connection[Any]) -> str:
        conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        time.sleep(0.2)  # hold the record while the twin arrives
        return "R-1"

    def call(attempt: int) -> None:
        both.wait()
        results.append(b.action(ctx(saga, Phase.ACTION, attempt), book))

    threads = [threading.Thread(target=call, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["R-1", "R-1"]
    assert effects(db) == [(str(saga), "booked")]


async def test_async_barrier_races_and_compensates(db: str) -> None:
    b = AsyncBarrier(db)
    saga = uuid.uuid4()
    started = asyncio.Event()

    async def book(conn: psycopg.AsyncConnection[Any]) -> str:
        await conn.execute("INSERT INTO effects VALUES (%s, 'booked')", (str(saga),))
        started.set()
        await asyncio.sleep(0.2)
        return "R-1"

    async def late_twin() -> Any:
        await started.wait()  # the first holds the record now
        return await b.action(ctx(saga, Phase.ACTION, 2), book)

    first, second = await asyncio.gather(b.action(ctx(saga, Phase.ACTION), book), late_twin())
    assert (first, second) == ("R-1", "R-1")

    async def cancel(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("INSERT INTO effects VALUES (%s, 'cancelled')", (str(saga),))

    await b.compensation(ctx(saga, Phase.COMPENSATION), cancel)
    await b.compensation(ctx(saga, Phase.COMPENSATION, 2), cancel)
    assert effects(db) == [(str(saga), "booked"), (str(saga), "cancelled")]

    other = uuid.uuid4()
    await b.compensation(ctx(other, Phase.COMPENSATION), cancel)
    with pytest.raises(Refused):
        await b.action(ctx(other, Phase.ACTION), book)


def test_purge_deletes_only_records_older_than_the_age(db: str) -> None:
    from datetime import timedelta

    barrier = Barrier(db)
    for _ in range(5):
        barrier.action(ctx(uuid.uuid4(), Phase.ACTION), lambda conn: 1)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE saga_barrier SET created_at = now() - interval '40 days'")
    young = ctx(uuid.uuid4(), Phase.ACTION)
    barrier.action(young, lambda conn: 1)
    assert barrier.purge_older_than(timedelta(days=30), batch=2) == 5
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM saga_barrier").fetchone()
    assert row is not None and row[0] == 1
    # The young record still answers a duplicate with the first result.
    assert barrier.action(young, lambda conn: 2) == 1
