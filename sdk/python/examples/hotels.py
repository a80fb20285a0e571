"""The travel example's ``hotels`` participant, written in Python: one
service of a mixed-language saga (flights and payment are the Rust
example's, ``sdk/rust/examples/travel.rs``).

    cargo run --release --bin sagad                                    # terminal 1
    python sdk/python/examples/hotels.py                               # terminal 2
    cargo run --release -p saga-sdk --features postgres --example travel -- --remote-hotels   # terminal 3

Flags: ``--coordinator URL`` (default http://127.0.0.1:50051),
``--database-url URL`` for the services' data (default
postgres://postgres@127.0.0.1:5432/travel; the Rust example creates it).

Bookings are exactly-once through the barrier, on the same ``saga_barrier``
table the Rust participants use.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass
from typing import Any

import psycopg

from saga_sdk import Client, Participant, Registration, Served, StepContext
from saga_sdk.barrier import AsyncBarrier

SCHEMA = b"""CREATE TABLE IF NOT EXISTS hotel_bookings (saga_id text PRIMARY KEY, traveller text NOT NULL,
             hotel text NOT NULL, nights int NOT NULL, status text NOT NULL)"""


@dataclass
class Trip:
    """The saga's input (the Rust example's ``Trip``)."""

    traveller: str
    flight: str
    hotel: str
    nights: int
    amount: int


def hotels(database_url: str) -> Participant:
    """The participant: book a hotel, cancel it."""
    barrier = AsyncBarrier(database_url)
    p = Participant("hotels")

    @p.action("book_hotel", input_type=Trip)
    async def book(ctx: StepContext, trip: Trip) -> dict[str, str]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
            await conn.execute(
                "INSERT INTO hotel_bookings VALUES (%s, %s, %s, %s, 'booked')",
                (str(ctx.saga_id), trip.traveller, trip.hotel, trip.nights),
            )
            return {"reference": f"HT-{str(ctx.saga_id)[:8]}"}

        result: dict[str, str] = await barrier.action(ctx, work)
        return result

    @p.compensation("cancel_hotel", input_type=Trip)
    async def cancel(ctx: StepContext, trip: Trip, booking: Any) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "UPDATE hotel_bookings SET status = 'cancelled' WHERE saga_id = %s",
                (str(ctx.saga_id),),
            )

        await barrier.compensation(ctx, work)

    return p


async def start(coordinator: str, database_url: str) -> tuple[Served, Registration, Client]:
    """Creates the tables, serves the participant on 127.0.0.1 and announces
    it to the coordinator."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(SCHEMA)
    await AsyncBarrier(database_url).create_table()
    p = hotels(database_url)
    served = await p.serve()
    client = Client(coordinator)
    registration = await p.register([client], served.endpoint)
    return served, registration, client


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinator", default="http://127.0.0.1:50051")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/travel")
    args = parser.parse_args()
    served, registration, client = await start(args.coordinator, args.database_url)
    print(f"hotels serving at {served.endpoint}, registered as {registration.instance_id}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await registration.stop()
    await served.stop()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
