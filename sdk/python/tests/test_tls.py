"""The client over TLS with a token, against sagad serving TLS with a
certificate made in the test (the `openssl` command line)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import uuid

import grpc
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

from saga_sdk._proto.saga.v1 import participant_pb2, participant_pb2_grpc

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


def signed_certificate(dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost
    (rustls, sagad's TLS, refuses a self-signed CA certificate as a leaf)."""
    certificate(dir)  # checks for openssl
    ca_key, ca, key, csr, cert = (dir / n for n in ("ca.key", "ca.pem", "leaf.key", "leaf.csr", "leaf.pem"))
    ext = dir / "leaf.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for cmd in (
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "1", "-subj", "/CN=test CA", "-keyout", str(ca_key), "-out", str(ca)],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)
    return ca, cert, key


async def test_sagad_calls_a_python_participant_over_tls_with_its_token(
    database: str, tmp_path: pathlib.Path
) -> None:
    ca, cert, key = signed_certificate(tmp_path)
    token = "participant-token-0123456789"
    token_file = tmp_path / "participant-token"
    token_file.write_text(token + "\n")
    p = Participant("py", require_token=token)
    calls: list[str] = []

    @p.action("echo")
    def echo(ctx: StepContext, data: object) -> object:
        calls.append(ctx.idempotency_key)
        return data

    served = await p.serve(tls=(cert.read_bytes(), key.read_bytes()))
    assert served.endpoint.startswith("https://")
    # Another caller, even over TLS, is refused before the handler runs.
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    async with grpc.aio.secure_channel(served.endpoint.removeprefix("https://"), creds) as ch:
        stub = participant_pb2_grpc.ParticipantServiceStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Invoke(
                participant_pb2.InvokeRequest(
                    saga_id=str(uuid.uuid4()), step="a", handler="echo", phase=participant_pb2.PHASE_ACTION
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert calls == []

    args = ["--participant-ca", str(ca), "--participant-token-file", str(token_file),
            "--require-participant-tls"]
    with run_sagad(database, *args) as sagad:
        async with Client(sagad.url) as client:
            reg = await p.register([client], served.endpoint)
            await client.register(SagaDefinition.build("echo", [step("a", "echo")]))
            started = await client.start("echo", {"x": 2})
            saga = await client.wait(started.saga.id, timeout=20)
            assert saga.state is SagaState.COMPLETED
            assert saga.step("a").output() == {"x": 2}
            await reg.stop()
    await served.stop(0)


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
            assert saga.started_by == "admin", "the principal is recorded"
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
