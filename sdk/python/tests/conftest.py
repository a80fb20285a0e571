"""Fixtures: a fresh PostgreSQL database per test and a real ``sagad``
process on 127.0.0.1 (the binary ``cargo build`` made, or ``SAGAD_BIN``)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import psycopg
import pytest

from saga_sdk import Client

ROOT = pathlib.Path(__file__).resolve().parents[3]
ADMIN_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def _db_url(name: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


@contextlib.contextmanager
def temp_database(prefix: str) -> Iterator[str]:
    """A database that exists until the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}".encode())
    try:
        yield _db_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


@pytest.fixture
def database() -> Iterator[str]:
    """sagad's database, for one test."""
    with temp_database("sagapy") as url:
        yield url


def sagad_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SAGAD_BIN", ROOT / "target" / "debug" / "sagad"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build --bin sagad` (or set SAGAD_BIN)")
    return path


@dataclass
class Sagad:
    """A running sagad process."""

    process: subprocess.Popen[str]
    url: str
    database_url: str
    lines: list[str]


@contextlib.contextmanager
def run_sagad(database: str, *extra: str) -> Iterator[Sagad]:
    """sagad on 127.0.0.1 with fast polls and a short lease, ports chosen by
    the OS; stopped (SIGTERM, by PID) at the end."""
    proc = subprocess.Popen(
        [
            str(sagad_bin()),
            "--database-url", database,
            "--grpc-addr", "127.0.0.1:0",
            "--admin-addr", "127.0.0.1:0",
            "--poll-interval-ms", "200",
            "--lease-ttl-ms", "2000",
            "--discovery-cache-ms", "0",
            "--shutdown-grace-ms", "1000",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    addr = None
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"sagad started grpc_addr=(\S+)", line)
        if m:
            addr = m.group(1)
            break
    if addr is None:
        proc.kill()
        pytest.fail("sagad did not start:\n" + "".join(lines))
    # Keep reading its output, so it never blocks on a full pipe.
    threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
    try:
        yield Sagad(process=proc, url=f"http://{addr}", database_url=database, lines=lines)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def sagad(database: str) -> Iterator[Sagad]:
    with run_sagad(database) as s:
        yield s


@pytest.fixture
async def client(sagad: Sagad) -> AsyncIterator[Client]:
    async with Client(sagad.url, actor="pytest") as c:
        yield c


@pytest.fixture
def data_db() -> Iterator[str]:
    """A second database, for a participant's own data and barrier."""
    with temp_database("sagapy_data") as url:
        yield url
