"""The client over TLS with a token, against sagad serving TLS with a
certificate made in the test (the `openssl` command line)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import uuid

import pytest

from saga_sdk import (
    Client,
    NotFound,
    Participant,
    SagaDefinition,
    SagaState,
    StepContext,
    Tls,
    Unauthenticated,
    Unavailable,
)

from .conftest import run_sagad
from .helpers import step


def certificate(dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is needed to make a test certificate")
    cert, key = dir / "cert.pem", dir / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_the_client_runs_a_saga_over_tls_with_a_token(
    database: str, tmp_path: pathlib.Path
) -> None:
    cert, key = certificate(tmp_path)
    token = "python-admin-token-0123"
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--admin-token", token]
    with run_sagad(database, *args) as sagad:
        url = sagad.url.replace("http://", "https://")
        tls = Tls(root_certificates=cert.read_bytes())
        p = Participant("py")

        @p.action("echo")
        def echo(ctx: StepContext, data: object) -> object:
            return data

        served = await p.serve()
        async with Client(url, tls=tls, token=token) as client:
            reg = await p.register([client], served.endpoint)
            await client.register(SagaDefinition.build("echo", [step("a", "echo")]))
            started = await client.start("echo", {"x": 1})
            saga = await client.wait(started.saga.id, timeout=20)
            assert saga.state is SagaState.COMPLETED
            with pytest.raises(NotFound):
                await client.resolve(uuid.uuid4(), "the token is accepted")
            await reg.stop()
        async with Client(url, tls=tls) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.resolve(saga.id, "x")
        # Plaintext to a TLS port: no answer.
        async with Client(sagad.url, timeout=5) as plain:
            with pytest.raises(Unavailable):
                await plain.get(saga.id)
        await served.stop(0)
