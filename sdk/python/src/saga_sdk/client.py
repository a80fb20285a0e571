"""The coordinator client (``grpc.aio``): definitions, sagas, operator calls.

Errors are raised as the classes of :mod:`saga_sdk.errors`, one per gRPC
status, never as strings.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
import builtins
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import timestamp_pb2

from ._proto.saga.v1 import coordinator_pb2 as pb
from ._proto.saga.v1 import coordinator_pb2_grpc as pb_grpc
from .definition import SagaDefinition
from .definition import duration_proto as _duration
from .errors import ProtocolError, SagaError, from_rpc_error

T = TypeVar("T")


class SagaState(str, enum.Enum):
    """Where a saga is in its life."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    SUSPENDED = "SUSPENDED"
    RESOLVED = "RESOLVED"

    @property
    def settled(self) -> bool:
        """Whether ``wait`` returns on this state."""
        return self not in (SagaState.RUNNING, SagaState.COMPENSATING)


class StepState(str, enum.Enum):
    """Where a step is."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"


@dataclass(frozen=True)
class StepStatus:
    """One step of a saga as the coordinator reports it."""

    name: str
    state: StepState
    attempts: int
    compensation_attempts: int
    last_error: str | None
    output_json: str | None
    next_attempt_at: datetime | None

    def output(self) -> Any:
        """The action's output, parsed (``None`` when it has none)."""
        return None if self.output_json is None else json.loads(self.output_json)


@dataclass(frozen=True)
class Saga:
    """A saga as the coordinator reports it."""

    id: uuid.UUID
    definition: str
    version: int
    state: SagaState
    input_json: str
    steps: tuple[StepStatus, ...]
    error: str | None
    created_at: datetime | None
    updated_at: datetime | None
    started_by: str | None = None
    """The principal that started it (None when sagad authenticates no one)."""

    def input(self) -> Any:
        """The saga's input, parsed."""
        return json.loads(self.input_json)

    def step(self, name: str) -> StepStatus:
        """The step called ``name``."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class SagaEvent:
    """One entry of a saga's history."""

    seq: int
    at: datetime | None
    kind: str
    step: str | None
    attempt: int
    detail: str


@dataclass(frozen=True)
class Started:
    """A started saga, and whether this call created it (``False``: the same
    id and input had started it before)."""

    saga: Saga
    created: bool


@dataclass(frozen=True)
class SagaPage:
    """One page of sagas, newest first."""

    sagas: tuple[Saga, ...]
    next_page_token: str | None


@dataclass(frozen=True)
class Tls:
    """TLS towards the coordinator: PEM bytes; ``None`` roots = the system's."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None


class Client:
    """A client of ``saga.v1.CoordinatorService``.

    ``target`` is ``http://host:port`` (plaintext), ``https://host:port``
    (TLS, see ``tls``) or ``host:port``. ``token`` is sent as
    ``authorization: Bearer <token>`` with every call; ``actor`` names who
    performs operator calls. Use it as an async context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        actor: str | None = None,
        tls: Tls | None = None,
        timeout: float = 30.0,
    ) -> None:
        secure = target.startswith("https://") or tls is not None
        address = target.removeprefix("http://").removeprefix("https://")
        if secure:
            t = tls or Tls()
            creds = grpc.ssl_channel_credentials(
                t.root_certificates, t.private_key, t.certificate_chain
            )
            self._channel = grpc.aio.secure_channel(address, creds)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata: list[tuple[str, str]] = []
        if token is not None:
            self._metadata.append(("authorization", f"Bearer {token}"))
        if actor is not None:
            self._metadata.append(("x-saga-actor", actor))
        self._timeout = timeout

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close(None)

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(
                request, metadata=self._metadata, timeout=timeout or self._timeout
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def register(self, definition: SagaDefinition) -> tuple[SagaDefinition, bool]:
        """Registers a definition; returns it with its version, and whether
        the version is new (identical content keeps its version)."""
        r = await self._call(
            self._stub.RegisterDefinition,
            pb.RegisterDefinitionRequest(definition=definition.to_proto()),
        )
        return SagaDefinition.from_proto(r.definition), bool(r.created)

    async def definitions(self) -> builtins.list[SagaDefinition]:
        """Every version of every definition, by name then version."""
        r = await self._call(self._stub.ListDefinitions, pb.ListDefinitionsRequest())
        return [SagaDefinition.from_proto(d) for d in r.definitions]

    async def start(
        self,
        definition: str,
        input: Any,
        *,
        saga_id: uuid.UUID | None = None,
        version: int | None = None,
    ) -> Started:
        """Starts a saga (latest version unless ``version``). A caller-chosen
        ``saga_id`` makes the start idempotent. ``input`` is JSON-serialised
        (dataclasses as dicts)."""
        r = await self._call(
            self._stub.StartSaga,
            pb.StartSagaRequest(
                definition=definition,
                version=version or 0,
                saga_id=str(saga_id) if saga_id else "",
                input_json=to_json(input),
            ),
        )
        return Started(saga=_saga(r.saga if r.HasField("saga") else None), created=r.created)

    async def get(self, saga_id: uuid.UUID) -> Saga:
        """The saga as it stands."""
        r = await self._call(self._stub.GetSaga, pb.GetSagaRequest(saga_id=str(saga_id)))
        return _saga(r.saga if r.HasField("saga") else None)

    async def wait(self, saga_id: uuid.UUID, timeout: float = 30.0) -> Saga:
        """Waits until the saga settles (completed, compensated, suspended,
        resolved) or ``timeout`` seconds pass; returns it as it stands."""
        r = await self._call(
            self._stub.WaitSaga,
            pb.WaitSagaRequest(saga_id=str(saga_id), timeout=_duration(timedelta(seconds=timeout))),
            timeout=timeout + self._timeout,
        )
        return _saga(r.saga if r.HasField("saga") else None)

    async def list(
        self,
        *,
        states: list[SagaState] | None = None,
        definition: str | None = None,
        stuck_only: bool = False,
        min_age: timedelta | None = None,
        page_size: int = 0,
        page_token: str | None = None,
    ) -> SagaPage:
        """A page of sagas, newest first."""
        r = await self._call(
            self._stub.ListSagas,
            pb.ListSagasRequest(
                states=[cast(pb.SagaState, pb.SagaState.Value(f"SAGA_STATE_{s.value}")) for s in states or []],
                definition=definition or "",
                stuck_only=stuck_only,
                min_age=_duration(min_age),
                page_size=page_size,
                page_token=page_token or "",
            ),
        )
        return SagaPage(
            sagas=tuple(_saga(s) for s in r.sagas), next_page_token=r.next_page_token or None
        )

    async def events(self, saga_id: uuid.UUID) -> builtins.list[SagaEvent]:
        """The saga's history, oldest first."""
        r = await self._call(
            self._stub.GetSagaEvents, pb.GetSagaEventsRequest(saga_id=str(saga_id))
        )
        return [
            SagaEvent(
                seq=e.seq,
                at=_time(e.at) if e.HasField("at") else None,
                kind=e.kind,
                step=e.step or None,
                attempt=e.attempt,
                detail=e.detail,
            )
            for e in r.events
        ]

    async def retry(self, saga_id: uuid.UUID, note: str = "") -> Saga:
        """Operator: resume a suspended saga (or hurry a waiting retry)."""
        r = await self._call(
            self._stub.RetrySaga, pb.RetrySagaRequest(saga_id=str(saga_id), note=note)
        )
        return _saga(r.saga if r.HasField("saga") else None)

    async def abort(self, saga_id: uuid.UUID, note: str = "") -> Saga:
        """Operator: force compensation (only before the pivot)."""
        r = await self._call(
            self._stub.AbortSaga, pb.AbortSagaRequest(saga_id=str(saga_id), note=note)
        )
        return _saga(r.saga if r.HasField("saga") else None)

    async def resolve(self, saga_id: uuid.UUID, note: str) -> Saga:
        """Operator: mark a suspended saga resolved by hand (note required)."""
        r = await self._call(
            self._stub.ResolveSaga, pb.ResolveSagaRequest(saga_id=str(saga_id), note=note)
        )
        return _saga(r.saga if r.HasField("saga") else None)

    async def heartbeat(
        self, participant: str, instance_id: str, endpoint: str, ttl: float, weight: int = 1
    ) -> None:
        """Announces a participant instance for ``ttl`` seconds; 0 withdraws it.
        ``weight`` (1 to 1000) is its relative share of calls among the
        participant's instances."""
        await self._call(
            self._stub.Heartbeat,
            pb.HeartbeatRequest(
                participant=participant,
                instance_id=instance_id,
                endpoint=endpoint,
                ttl=_duration(timedelta(seconds=ttl)),
                weight=weight,
            ),
        )


def to_json(value: Any) -> str:
    """JSON text for a payload: dataclasses become objects, pydantic models
    are dumped with ``model_dump``."""
    return json.dumps(value, default=_encode, separators=(",", ":"))


def _encode(value: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _saga(s: pb.Saga | None) -> Saga:
    if s is None:
        raise ProtocolError("answer without a saga")
    try:
        steps = tuple(
            StepStatus(
                name=st.name,
                state=StepState(pb.StepState.Name(st.state).removeprefix("STEP_STATE_")),
                attempts=st.attempts,
                compensation_attempts=st.compensation_attempts,
                last_error=st.last_error or None,
                output_json=st.output_json or None,
                next_attempt_at=_time(st.next_attempt_at) if st.HasField("next_attempt_at") else None,
            )
            for st in s.steps
        )
        return Saga(
            id=uuid.UUID(s.saga_id),
            definition=s.definition,
            version=s.version,
            state=SagaState(pb.SagaState.Name(s.state).removeprefix("SAGA_STATE_")),
            input_json=s.input_json,
            steps=steps,
            error=s.error or None,
            created_at=_time(s.created_at) if s.HasField("created_at") else None,
            updated_at=_time(s.updated_at) if s.HasField("updated_at") else None,
            started_by=s.started_by or None,
        )
    except ValueError as e:
        raise ProtocolError(f"unexpected saga from the coordinator: {e}") from None


def _time(t: timestamp_pb2.Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=timezone.utc)


__all__ = [
    "Client",
    "Saga",
    "SagaEvent",
    "SagaPage",
    "SagaState",
    "SagaError",
    "Started",
    "StepState",
    "StepStatus",
    "Tls",
    "to_json",
]
