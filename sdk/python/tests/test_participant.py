"""Python participants against a real sagad: DESIGN.md's outcome table,
reverse compensation, typed inputs, heartbeat registration and withdrawal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from saga_sdk import (
    Client,
    Participant,
    Refused,
    Registration,
    RetryLater,
    SagaDefinition,
    SagaState,
    StepContext,
    StepState,
    Unknown,
)

from .conftest import Sagad
from .helpers import step


@dataclass
class Order:
    n: int


class Script:
    """A participant whose handlers fail the first `fail` calls as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.p = Participant("py")
        p = self.p

        @p.action("ok", input_type=Order)
        def ok(ctx: StepContext, order: Order) -> dict[str, int]:
            self.calls.append(("action", ctx.step, ctx.attempt))
            return {"n": order.n + 1}

        @p.action("next")
        def next_(ctx: StepContext, order: Order) -> dict[str, Any]:
            self.calls.append(("action", ctx.step, ctx.attempt))
            return {
                "n": ctx.output("a")["n"] + 1,
                "key": ctx.idempotency_key,
                "saga": str(ctx.saga_id),
            }

        @p.action("refuse")
        async def refuse(ctx: StepContext, _: Any) -> None:
            self.calls.append(("action", ctx.step, ctx.attempt))
            raise Refused("card declined")

        @p.action("later")
        async def later(ctx: StepContext, _: Any) -> str:
            self.calls.append(("action", ctx.step, ctx.attempt))
            if ctx.attempt == 1:
                raise RetryLater("busy")
            return "done"

        @p.action("unknown")
        async def unknown(ctx: StepContext, _: Any) -> str:
            self.calls.append(("action", ctx.step, ctx.attempt))
            if ctx.attempt == 1:
                raise Unknown("lost the reply")
            return "done"

        @p.action("crash")
        async def crash(ctx: StepContext, _: Any) -> str:
            self.calls.append(("action", ctx.step, ctx.attempt))
            if ctx.attempt == 1:
                raise RuntimeError("boom")
            return "done"

        @p.compensation("undo")
        async def undo(ctx: StepContext, _: Any, output: Any) -> None:
            self.calls.append(("compensation", ctx.step, ctx.attempt))


@pytest.fixture
async def script(sagad: Sagad, client: Client) -> AsyncIterator[Script]:
    s = Script()
    served = await s.p.serve()
    reg = await s.p.register([client], served.endpoint)
    yield s
    await reg.stop()
    await served.stop(0)


async def run(client: Client, name: str, steps: list[Any], data: Any) -> Any:
    await client.register(SagaDefinition.build(name, steps))
    started = await client.start(name, data)
    return await client.wait(started.saga.id, timeout=20)


async def test_outcome_table(client: Client, script: Script) -> None:
    saga = await run(client, "ok", [step("a", "ok"), step("b", "next")], {"n": 1})
    assert saga.state is SagaState.COMPLETED
    assert saga.step("a").output() == {"n": 2}
    # A handler sees the earlier steps' outputs, the saga id and the key.
    assert saga.step("b").output() == {"n": 3, "key": f"{saga.id}/b/action", "saga": str(saga.id)}

    saga = await run(
        client, "refused", [step("a", "ok", compensation="undo"), step("b", "refuse")], {"n": 1}
    )
    assert saga.state is SagaState.COMPENSATED
    assert [s.state for s in saga.steps] == [StepState.COMPENSATED, StepState.FAILED]
    assert saga.step("b").last_error == "card declined"

    # "Not now" is retried even for a step that is not idempotent.
    saga = await run(client, "later", [step("a", "later", idempotent=False)], {})
    assert saga.state is SagaState.COMPLETED
    assert saga.step("a").attempts == 2

    for handler, code in [("unknown", "UNAVAILABLE"), ("crash", "INTERNAL")]:
        saga = await run(client, handler, [step("a", handler)], {})
        assert saga.state is SagaState.COMPLETED, saga
        events = await client.events(saga.id)
        retry = [e for e in events if e.kind == "step_retry"]
        assert retry and retry[0].detail.startswith(code), events

    saga = await run(client, "missing", [step("a", "no_such_handler")], {})
    assert saga.state is SagaState.SUSPENDED
    assert saga.error is not None and "UNIMPLEMENTED" in saga.error
    # The operator deploys the handler and retries: the saga finishes.
    script.p.action("no_such_handler")(lambda ctx, data: "deployed")
    await client.retry(saga.id, "handler deployed")
    saga = await client.wait(saga.id, timeout=20)
    assert saga.state is SagaState.COMPLETED
    assert saga.step("a").output() == "deployed"

    # Input that does not fit the handler's type: a contract error.
    saga = await run(client, "badinput", [step("a", "ok")], {"m": 1})
    assert saga.state is SagaState.SUSPENDED
    assert saga.error is not None and "INVALID_ARGUMENT" in saga.error


async def test_compensations_run_in_reverse(client: Client, script: Script) -> None:
    saga = await run(
        client,
        "three",
        [
            step("a", "ok", compensation="undo"),
            step("b", "ok", compensation="undo"),
            step("c", "refuse"),
        ],
        {"n": 0},
    )
    assert saga.state is SagaState.COMPENSATED
    assert [c[:2] for c in script.calls] == [
        ("action", "a"),
        ("action", "b"),
        ("action", "c"),
        ("compensation", "b"),
        ("compensation", "a"),
    ]


def instances(sagad: Sagad) -> list[tuple[str, str]]:
    with psycopg.connect(sagad.database_url) as c:
        return [
            (r[0], r[1])
            for r in c.execute(
                "SELECT participant, endpoint FROM participant_instances WHERE expires_at > now()"
            ).fetchall()
        ]


async def test_heartbeat_registers_and_withdraws(sagad: Sagad, client: Client) -> None:
    s = Script()
    served = await s.p.serve()
    reg: Registration = await s.p.register([client], served.endpoint, ttl=30)
    assert instances(sagad) == [("py", served.endpoint)]
    saga = await run(client, "ok", [step("a", "ok")], {"n": 1})
    assert saga.state is SagaState.COMPLETED

    await reg.stop()
    assert instances(sagad) == []
    # Withdrawn: calls find no live instance (and the handler is not called);
    # the pivot's budget spent, the saga waits for an operator.
    calls = len(s.calls)
    started = await client.start("ok", {"n": 1})
    saga = await client.wait(started.saga.id, timeout=20)
    assert saga.state is SagaState.SUSPENDED
    assert saga.error is not None and "no live instance" in saga.error, saga
    assert len(s.calls) == calls
    await served.stop(0)


async def test_shares_a_server_with_other_services(sagad: Sagad, client: Client) -> None:
    import grpc

    server = grpc.aio.server()
    s = Script()
    s.p.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reg = await s.p.register([client], f"http://127.0.0.1:{port}")
    saga = await run(client, "ok", [step("a", "ok")], {"n": 41})
    assert saga.step("a").output() == {"n": 42}
    await reg.stop()
    await server.stop(0)


async def test_a_call_that_arrives_after_its_deadline_is_not_run() -> None:
    import datetime as dt
    import uuid

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from saga_sdk._proto.saga.v1 import participant_pb2, participant_pb2_grpc

    p = Participant("late")
    runs: list[str] = []

    @p.action("act")
    def act(ctx: StepContext, _: Any) -> None:
        runs.append(ctx.idempotency_key)

    served = await p.serve()

    def stamp(t: dt.datetime) -> Timestamp:
        ts = Timestamp()
        ts.FromDatetime(t)
        return ts

    def request(deadline: dt.datetime, arrive_by: dt.datetime | None = None) -> Any:
        return participant_pb2.InvokeRequest(
            saga_id=str(uuid.uuid4()), step="a", handler="act", idempotency_key="k",
            phase=participant_pb2.PHASE_ACTION, input_json="{}", deadline=stamp(deadline),
            arrive_by=None if arrive_by is None else stamp(arrive_by),
        )

    now = dt.datetime.now(dt.timezone.utc)
    past, future = now - dt.timedelta(milliseconds=1), now + dt.timedelta(seconds=30)
    async with grpc.aio.insecure_channel(served.endpoint.removeprefix("http://")) as ch:
        stub = participant_pb2_grpc.ParticipantServiceStub(ch)  # type: ignore[no-untyped-call]
        # An older coordinator's call: the deadline is the limit.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Invoke(request(past))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The arrival limit passed though the coordinator would still wait.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Invoke(request(future, past))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert runs == []
        await stub.Invoke(request(future))
        await stub.Invoke(request(future, future))
        assert runs == ["k", "k"]
    await served.stop(0)
