"""The mixed-language travel saga end to end: flights and payment served by
the Rust example, hotels by the Python example, one sagad."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

import psycopg
import pytest

from .conftest import ROOT, Sagad

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import hotels  # noqa: E402


def travel_bin() -> pathlib.Path:
    path = pathlib.Path(
        os.environ.get("TRAVEL_BIN", ROOT / "target" / "debug" / "examples" / "travel")
    )
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run `cargo build -p saga-sdk --features postgres --example travel`"
        )
    return path


async def test_one_trip_completes_and_one_is_compensated(sagad: Sagad, data_db: str) -> None:
    served, registration, client = await hotels.start(sagad.url, data_db)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(travel_bin()),
            "--coordinator", sagad.url,
            "--database-url", data_db,
            "--remote-hotels",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        text = out.decode()
        assert proc.returncode == 0, text
        assert "(hotels: remote)" in text and "outcomes: Completed, Compensated" in text, text
    finally:
        await registration.stop()
        await served.stop(0)
        await client.close()
    with psycopg.connect(data_db) as c:
        rows = c.execute("SELECT traveller, status FROM hotel_bookings ORDER BY traveller").fetchall()
        barrier = c.execute(
            "SELECT step, phase, state FROM saga_barrier WHERE step = 'hotel' ORDER BY phase"
        ).fetchall()
    # Ada's trip completes; Bob's payment is refused and his hotel cancelled
    # by the Python compensation.
    assert rows == [("Ada", "booked"), ("Bob", "cancelled")]
    assert sorted(barrier) == [
        ("hotel", "action", "done"),
        ("hotel", "action", "done"),
        ("hotel", "compensation", "done"),
    ]
