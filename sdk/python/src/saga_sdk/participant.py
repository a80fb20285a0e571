"""Participants: saga step handlers served as ``saga.v1.ParticipantService``
on ``grpc.aio``.

A handler receives a :class:`StepContext` and the saga's input (typed when
the handler names a dataclass or pydantic model for it) and answers:

==================================  ==========================================
the handler                         the coordinator hears
==================================  ==========================================
returns a value                     ``OUTCOME_SUCCEEDED`` with it as output
raises :class:`Refused`             ``OUTCOME_FAILED``: a business refusal,
                                    nothing happened (the saga compensates)
raises :class:`RetryLater`          ``OUTCOME_RETRY``: not now, nothing done
raises :class:`Unknown`             ``UNAVAILABLE``: the effect is unknown
                                    (idempotent steps are retried)
raises anything else (a crash)      ``INTERNAL`` (also retried when
                                    idempotent); the server keeps serving
input that does not fit its type    ``INVALID_ARGUMENT`` (the saga suspends)
no handler of that name             ``UNIMPLEMENTED`` (the saga suspends)
==================================  ==========================================

A compensation may be called for an action that never ran here and must
succeed then too; :mod:`saga_sdk.barrier` makes that automatic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import inspect
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable, TypeVar, Union

import grpc

from ._proto.saga.v1 import participant_pb2 as pb
from ._proto.saga.v1 import participant_pb2_grpc as pb_grpc
from .client import Client, to_json
from .errors import SagaError

log = logging.getLogger("saga_sdk")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Refused(Exception):
    """A business refusal: the step did not and will not take effect."""


class RetryLater(Exception):
    """Not now, and nothing took effect: the coordinator calls again."""


class Unknown(Exception):
    """Something went wrong and whether the step took effect is unknown."""


class Phase(str, enum.Enum):
    """Which handler of a step is called."""

    ACTION = "action"
    COMPENSATION = "compensation"


@dataclass(frozen=True)
class StepContext:
    """What the coordinator says about one call."""

    saga_id: uuid.UUID
    definition: str
    step: str
    phase: Phase
    handler: str
    #: 1 for the first attempt of this phase.
    attempt: int
    #: ``saga_id/step/phase``, stable across attempts.
    idempotency_key: str
    input_json: str
    #: Outputs of earlier steps (JSON text), by step name.
    outputs_json: dict[str, str] = field(default_factory=dict)
    #: Compensations only: this step's action output (JSON text), if any.
    action_output_json: str | None = None
    #: When the coordinator stops waiting for the answer.
    deadline: datetime | None = None
    #: When the call had to arrive by (the coordinator's lease covers
    #: arrivals until then); a later call is refused unrun.
    arrive_by: datetime | None = None
    #: The epoch of the coordinator's lease on the saga: it grows with every
    #: takeover, so a saga's calls arrive with epochs that never go down.
    lease_epoch: int = 0

    def output(self, step: str) -> Any:
        """The output of an earlier step, parsed (``None`` if it has none)."""
        text = self.outputs_json.get(step)
        return None if text is None else json.loads(text)


Handler = Callable[..., Union[Any, Awaitable[Any]]]


@dataclass
class _Registered:
    fn: Handler
    input_type: type[Any] | None
    output_type: type[Any] | None = None


class Participant:
    """A participant: a logical service name and its handlers.

    >>> hotels = Participant("hotels")
    >>> @hotels.action("book_hotel", input_type=dict)
    ... async def book(ctx: StepContext, trip: dict) -> dict:
    ...     return {"reference": "HT-1"}
    """

    def __init__(self, name: str, *, require_token: str | None = None) -> None:
        """``require_token``: accept only calls carrying
        ``authorization: Bearer <token>`` — the token sagad sends
        (``--participant-token-file``); others are refused with
        ``UNAUTHENTICATED`` before any handler runs."""
        self.name = name
        self._actions: dict[str, _Registered] = {}
        self._compensations: dict[str, _Registered] = {}
        self._token = require_token.strip() if require_token is not None else None

    def action(self, handler: str, *, input_type: type[Any] | None = None) -> Callable[[F], F]:
        """Registers ``fn(ctx, input)`` as the action ``handler``. With
        ``input_type`` (a dataclass, a pydantic model, or ``dict``) the
        saga's input is converted to it; otherwise it is the parsed JSON."""

        def register(fn: F) -> F:
            self._actions[handler] = _Registered(fn, input_type)
            return fn

        return register

    def compensation(
        self,
        handler: str,
        *,
        input_type: type[Any] | None = None,
        action_output_type: type[Any] | None = None,
    ) -> Callable[[F], F]:
        """Registers ``fn(ctx, input, action_output)`` as the compensation
        ``handler``; ``action_output`` is ``None`` when the action never
        answered (a null compensation)."""

        def register(fn: F) -> F:
            self._compensations[handler] = _Registered(fn, input_type, action_output_type)
            return fn

        return register

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Adds the participant service to a ``grpc.aio`` server that may
        also serve the service's own APIs."""
        pb_grpc.add_ParticipantServiceServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: tuple[bytes, bytes] | None = None,
        client_ca: bytes | None = None,
    ) -> "Served":
        """Serves only this participant; returns the server and its endpoint.
        ``tls`` is a PEM (certificate chain, key): served over TLS, the
        endpoint is ``https://``; ``client_ca`` also asks callers for a
        certificate it signed (mutual TLS: only sagad with
        ``--participant-cert`` gets through)."""
        server = grpc.aio.server()
        self.add_to_server(server)
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
            scheme = "http"
        else:
            creds = grpc.ssl_server_credentials(
                [(tls[1], tls[0])],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            bound = server.add_secure_port(f"{host}:{port}", creds)
            scheme = "https"
        await server.start()
        return Served(server=server, endpoint=f"{scheme}://{host}:{bound}")

    def accepts(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether a call with this metadata may run (see ``require_token``)."""
        if self._token is None:
            return True
        given = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(given, str) or not given.startswith("Bearer "):
            return False
        return hmac.compare_digest(given[len("Bearer "):].encode(), self._token.encode())

    async def register(
        self,
        coordinators: Iterable[Client],
        endpoint: str,
        *,
        ttl: float = 10.0,
        every: float | None = None,
        weight: int = 1,
    ) -> "Registration":
        """Announces ``endpoint`` to each coordinator now and then every
        ``every`` seconds (default ``ttl / 3``), under a fresh instance id,
        with ``weight`` (1 to 1000), its relative share of calls.
        Raises the first error if no coordinator accepts the first
        announcement."""
        reg = Registration(
            participant=self.name,
            instance_id=f"{self.name}-{uuid.uuid4()}",
            endpoint=endpoint,
            clients=list(coordinators),
            ttl=ttl,
            weight=weight,
        )
        await reg.beat(first=True)
        reg.start(every if every is not None else ttl / 3)
        return reg

    async def invoke(self, request: pb.InvokeRequest) -> pb.InvokeResponse:
        """Answers one call (what the gRPC service does); raises
        :class:`_Abort` for answers that are gRPC statuses."""
        phase = Phase.ACTION if request.phase == pb.PHASE_ACTION else Phase.COMPENSATION
        table = self._actions if phase is Phase.ACTION else self._compensations
        reg = table.get(request.handler)
        if reg is None:
            raise _Abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"participant {self.name!r} has no {phase.value} handler {request.handler!r}",
            )
        ctx = _context(request, phase)
        # A call that arrives after its arrival limit is not run: the
        # coordinator's lease on the saga covered arrivals only until then,
        # so another coordinator may be driving the saga. Older coordinators
        # send only the deadline, which their lease outlived.
        limit = ctx.arrive_by if ctx.arrive_by is not None else ctx.deadline
        if limit is not None and datetime.now(timezone.utc) > limit:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call arrived after its deadline; not run")
        try:
            args = _arguments(reg, ctx, phase)
        except (ValueError, TypeError) as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.handler}: {e}") from None
        try:
            result = reg.fn(*args)
            if inspect.isawaitable(result):
                result = await result
        except Refused as e:
            return pb.InvokeResponse(outcome=pb.OUTCOME_FAILED, error=str(e))
        except RetryLater as e:
            return pb.InvokeResponse(outcome=pb.OUTCOME_RETRY, error=str(e))
        except Unknown as e:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except Exception as e:  # a crash: the effect is unknown
            log.exception("handler %r crashed", request.handler)
            raise _Abort(
                grpc.StatusCode.INTERNAL, f"handler {request.handler!r} crashed: {e!r}"
            ) from None
        output = "" if phase is Phase.COMPENSATION or result is None else to_json(result)
        return pb.InvokeResponse(outcome=pb.OUTCOME_SUCCEEDED, output_json=output)


@dataclass
class Served:
    """A running participant server."""

    server: grpc.aio.Server
    #: ``http://host:port``, for :meth:`Participant.register`.
    endpoint: str

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)


@dataclass
class Registration:
    """A participant instance announced to coordinators; :meth:`stop`
    withdraws it."""

    participant: str
    instance_id: str
    endpoint: str
    clients: list[Client]
    ttl: float
    weight: int = 1
    _task: asyncio.Task[None] | None = None

    async def beat(self, *, first: bool = False, ttl: float | None = None) -> None:
        errors: list[SagaError] = []
        for c in self.clients:
            try:
                await c.heartbeat(
                    self.participant,
                    self.instance_id,
                    self.endpoint,
                    self.ttl if ttl is None else ttl,
                    self.weight,
                )
            except SagaError as e:
                errors.append(e)
        if first and len(errors) == len(self.clients):
            raise errors[0] if errors else ValueError("no coordinator given")
        for err in errors:
            log.warning("heartbeat of %s failed: %s", self.instance_id, err)

    def start(self, every: float) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                await self.beat()

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        """Stops heartbeating and withdraws the instance (a zero TTL), so no
        coordinator calls it again."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.beat(ttl=0)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Servicer(pb_grpc.ParticipantServiceServicer):
    def __init__(self, participant: Participant) -> None:
        self._p = participant

    async def Invoke(  # noqa: N802 (the generated name)
        self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InvokeResponse:
        if not self._p.accepts(context.invocation_metadata()):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this participant accepts calls from sagad only: missing or wrong authorization",
            )
        try:
            return await self._p.invoke(request)
        except _Abort as a:
            await context.abort(a.code, a.message)
            raise  # unreachable: abort raises


def _context(r: pb.InvokeRequest, phase: Phase) -> StepContext:
    try:
        saga_id = uuid.UUID(r.saga_id)
    except ValueError:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"saga_id: {r.saga_id!r} is not a UUID") from None
    return StepContext(
        saga_id=saga_id,
        definition=r.definition,
        step=r.step,
        phase=phase,
        handler=r.handler,
        attempt=r.attempt,
        idempotency_key=r.idempotency_key,
        input_json=r.input_json,
        outputs_json=dict(r.outputs_json),
        action_output_json=r.action_output_json or None,
        deadline=r.deadline.ToDatetime(tzinfo=timezone.utc) if r.HasField("deadline") else None,
        arrive_by=r.arrive_by.ToDatetime(tzinfo=timezone.utc) if r.HasField("arrive_by") else None,
        lease_epoch=r.lease_epoch,
    )


def _arguments(reg: _Registered, ctx: StepContext, phase: Phase) -> tuple[Any, ...]:
    data = json.loads(ctx.input_json) if ctx.input_json else None
    value = convert(data, reg.input_type, "saga input")
    if phase is Phase.ACTION:
        return (ctx, value)
    out = None if ctx.action_output_json is None else json.loads(ctx.action_output_json)
    return (ctx, value, None if out is None else convert(out, reg.output_type, "action output"))


def convert(data: Any, to: type[Any] | None, what: str) -> Any:
    """Parsed JSON as ``to``: a dataclass (from an object's fields), a
    pydantic model (``model_validate``), or a plain type checked with
    ``isinstance``; ``None`` leaves it as parsed."""
    if to is None:
        return data
    if dataclasses.is_dataclass(to):
        if not isinstance(data, dict):
            raise ValueError(f"{what} is not an object")
        try:
            return to(**data)
        except TypeError as e:
            raise ValueError(f"{what} does not fit {to.__name__}: {e}") from None
    validate = getattr(to, "model_validate", None)
    if callable(validate):
        try:
            return validate(data)
        except Exception as e:  # pydantic's ValidationError
            raise ValueError(f"{what} does not fit {to.__name__}: {e}") from None
    if not isinstance(data, to):
        raise ValueError(f"{what} is not a {to.__name__}")
    return data
