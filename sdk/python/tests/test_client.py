"""The client's errors: one class per status, the field named."""

from __future__ import annotations

import hashlib
import pathlib
import uuid
from collections.abc import AsyncIterator

import pytest

from saga_sdk import (
    AlreadyExists,
    Client,
    DefinitionError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Participant,
    PermissionDenied,
    SagaDefinition,
    SagaError,
    SagaState,
    Step,
    StepContext,
    Unauthenticated,
    Unavailable,
)

from .conftest import Sagad, run_sagad
from .helpers import step


@pytest.fixture
async def echo(client: Client) -> AsyncIterator[None]:
    p = Participant("py")

    @p.action("echo")
    def echo(ctx: StepContext, data: object) -> object:
        return data

    served = await p.serve()
    reg = await p.register([client], served.endpoint)
    yield
    await reg.stop()
    await served.stop(0)


def test_definitions_are_checked_before_sending() -> None:
    ok = SagaDefinition.build(
        "order",
        [
            Step("reserve", "inventory", compensation="release"),
            Step("charge", "payments"),
            Step("ship", "shipping", idempotent=True),
        ],
    )
    assert [s.name for s in ok.steps] == ["reserve", "charge", "ship"]
    cases = [
        ([Step("charge", "payments"), Step("ship", "s", idempotent=True, compensation="u")], "steps[1].compensation"),
        ([Step("charge", "payments"), Step("ship", "s")], "steps[1].idempotent"),
        ([Step("a", "p"), Step("a", "p", idempotent=True)], "steps[1].name"),
        ([Step("a", "bad participant")], "steps[0].participant"),
        ([], "steps"),
    ]
    for steps, field in cases:
        with pytest.raises(DefinitionError) as e:
            SagaDefinition.build("order", steps)
        assert e.value.field == field
        assert isinstance(e.value, InvalidArgument) and isinstance(e.value, SagaError)


async def test_errors_are_classes_per_status(sagad: Sagad, client: Client, echo: None) -> None:
    with pytest.raises(NotFound):
        await client.get(uuid.uuid4())
    with pytest.raises(NotFound):
        await client.start("nope", {})

    d, created = await client.register(SagaDefinition.build("echo", [step("a", "echo")]))
    assert (d.version, created) == (1, True)
    again, created = await client.register(SagaDefinition.build("echo", [step("a", "echo")]))
    assert (again.version, created) == (1, False)
    assert [x.name for x in await client.definitions()] == ["echo"]

    sid = uuid.uuid4()
    first = await client.start("echo", {"x": 1}, saga_id=sid)
    assert first.created
    same = await client.start("echo", {"x": 1}, saga_id=sid)
    assert not same.created and same.saga.id == sid
    with pytest.raises(AlreadyExists):
        await client.start("echo", {"x": 2}, saga_id=sid)

    done = await client.wait(sid, timeout=20)
    assert done.state is SagaState.COMPLETED
    assert done.step("a").output() == {"x": 1}
    with pytest.raises(InvalidArgument) as bad:
        await client.resolve(sid, "")
    assert "note" in bad.value.message
    with pytest.raises(FailedPrecondition):
        await client.abort(sid, "too late")

    page = await client.list(states=[SagaState.COMPLETED])
    assert [s.id for s in page.sagas] == [sid]
    kinds = [e.kind for e in await client.events(sid)]
    assert kinds[0] == "started" and kinds[-1] == "completed"


async def test_an_unreachable_coordinator_is_unavailable() -> None:
    async with Client("http://127.0.0.1:1", timeout=2) as c:
        with pytest.raises(Unavailable):
            await c.get(uuid.uuid4())


async def test_credentials_travel_with_every_call(database: str, tmp_path: pathlib.Path) -> None:
    token = "python-sdk-token-0123"
    viewer = "python-viewer-token-0123"
    auth = tmp_path / "auth.yaml"
    digest = hashlib.sha256(viewer.encode()).hexdigest()
    auth.write_text(f"principals:\n  - {{name: dash, token_sha256: {digest}, roles: [viewer]}}\n")
    with run_sagad(database, "--admin-token", token, "--auth-file", str(auth)) as sagad:
        async with Client(sagad.url) as anonymous, Client(sagad.url, token=token, actor="ops") as ops:
            # Unknown saga: the credential is checked first.
            with pytest.raises(Unauthenticated):
                await anonymous.resolve(uuid.uuid4(), "x")
            with pytest.raises(Unauthenticated):
                await anonymous.list()
            async with Client(sagad.url, token="wrong-token-wrong") as wrong:
                with pytest.raises(Unauthenticated):
                    await wrong.resolve(uuid.uuid4(), "x")
            async with Client(sagad.url, token=viewer) as dash:
                await dash.list()
                with pytest.raises(PermissionDenied, match="needs role operator"):
                    await dash.resolve(uuid.uuid4(), "x")
            with pytest.raises(NotFound):
                await ops.resolve(uuid.uuid4(), "x")
