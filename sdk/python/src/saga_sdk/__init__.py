"""saga-sdk for Python: write saga participants for ``sagad``, define sagas,
start and watch them.

- :class:`Participant`: register action and compensation handlers by
  decorator, serve them on ``grpc.aio`` (alone, or on your own server beside
  your services), and announce the endpoint to the coordinator.
- :class:`Client`: register :class:`SagaDefinition` s (checked before
  sending), start sagas, wait, get, list, read history, and the operator calls.
- :mod:`saga_sdk.barrier` (extra ``postgres``): exactly-once effects for
  handlers whose work is in PostgreSQL, on the same table as the Rust SDK's.
"""

from .client import (
    Client,
    Saga,
    SagaEvent,
    SagaPage,
    SagaState,
    Started,
    StepState,
    StepStatus,
    Tls,
)
from .definition import RetryPolicy, SagaDefinition, Step
from .errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    DefinitionError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    SagaError,
    Unauthenticated,
    Unavailable,
)
from .participant import (
    Participant,
    Phase,
    Refused,
    Registration,
    RetryLater,
    Served,
    StepContext,
    Unknown,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "DefinitionError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Participant",
    "PermissionDenied",
    "Phase",
    "ProtocolError",
    "Refused",
    "Registration",
    "ResourceExhausted",
    "RetryLater",
    "RetryPolicy",
    "Saga",
    "SagaDefinition",
    "SagaError",
    "SagaEvent",
    "SagaPage",
    "SagaState",
    "Served",
    "Started",
    "Step",
    "StepContext",
    "StepState",
    "StepStatus",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
]
