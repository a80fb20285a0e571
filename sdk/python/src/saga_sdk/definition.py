"""Saga definitions, checked before they are sent.

A definition is an ordered list of steps. The order rule (DESIGN.md) is
checked here, before anything reaches the coordinator:
compensatable* pivot? retriable* — steps with a compensation, then at most
one step without (the pivot, the point of no return), then steps without a
compensation that must be idempotent (they are retried until they succeed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

from google.protobuf import duration_pb2

from ._proto.saga.v1 import coordinator_pb2 as pb
from .errors import DefinitionError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; unset values take the
    coordinator's defaults."""

    max_attempts: int | None = None
    initial_backoff: timedelta | None = None
    multiplier: float | None = None
    max_backoff: timedelta | None = None

    def to_proto(self) -> pb.RetryPolicy:
        return pb.RetryPolicy(
            max_attempts=self.max_attempts or 0,
            initial_backoff=duration_proto(self.initial_backoff),
            multiplier=self.multiplier or 0.0,
            max_backoff=duration_proto(self.max_backoff),
        )


@dataclass(frozen=True)
class Step:
    """One step: an action at a participant and, before the pivot, its
    compensation. The action handler is named like the step unless
    ``action`` says otherwise."""

    name: str
    participant: str
    action: str | None = None
    compensation: str | None = None
    idempotent: bool = False
    timeout: timedelta | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = field(default_factory=RetryPolicy)

    def to_proto(self) -> pb.StepDefinition:
        return pb.StepDefinition(
            name=self.name,
            participant=self.participant,
            action=self.action or self.name,
            compensation=self.compensation or "",
            idempotent=self.idempotent,
            timeout=duration_proto(self.timeout),
            retry=self.retry.to_proto(),
            compensation_retry=self.compensation_retry.to_proto(),
        )


@dataclass(frozen=True)
class SagaDefinition:
    """A checked definition; build it with :meth:`SagaDefinition.build`.

    ``version`` is 0 until the coordinator assigns one (see
    :meth:`saga_sdk.Client.register`)."""

    name: str
    steps: tuple[Step, ...]
    deadline: timedelta | None = None
    version: int = 0

    @staticmethod
    def build(
        name: str, steps: list[Step], deadline: timedelta | None = None
    ) -> "SagaDefinition":
        """Checks names and the step order; raises :class:`DefinitionError`
        naming the field."""
        _check_name("name", name)
        if not steps:
            raise DefinitionError("steps", "must not be empty")
        pivot: str | None = None
        seen: set[str] = set()
        for i, s in enumerate(steps):
            _check_name(f"steps[{i}].name", s.name)
            _check_name(f"steps[{i}].participant", s.participant)
            if s.action is not None and not s.action:
                raise DefinitionError(f"steps[{i}].action", "must not be empty")
            if s.name in seen:
                raise DefinitionError(f"steps[{i}].name", f"step name {s.name!r} is used twice")
            seen.add(s.name)
            if pivot is not None and s.compensation:
                raise DefinitionError(
                    f"steps[{i}].compensation",
                    f"step {s.name!r} comes after the pivot {pivot!r} and cannot have a compensation",
                )
            if pivot is not None and not s.idempotent:
                raise DefinitionError(
                    f"steps[{i}].idempotent",
                    f"step {s.name!r} comes after the pivot {pivot!r}, so it must be idempotent",
                )
            if pivot is None and not s.compensation:
                pivot = s.name
        return SagaDefinition(name=name, steps=tuple(steps), deadline=deadline)

    def to_proto(self) -> pb.SagaDefinition:
        return pb.SagaDefinition(
            name=self.name,
            version=self.version,
            steps=[s.to_proto() for s in self.steps],
            deadline=duration_proto(self.deadline),
        )

    @staticmethod
    def from_proto(d: pb.SagaDefinition) -> "SagaDefinition":
        """A definition as the coordinator returned it (version set)."""
        steps = tuple(
            Step(
                name=s.name,
                participant=s.participant,
                action=s.action,
                compensation=s.compensation or None,
                idempotent=s.idempotent,
                timeout=s.timeout.ToTimedelta() if s.HasField("timeout") else None,
            )
            for s in d.steps
        )
        deadline = d.deadline.ToTimedelta() if d.HasField("deadline") else None
        return SagaDefinition(name=d.name, steps=steps, deadline=deadline, version=d.version)


def _check_name(field_name: str, name: str) -> None:
    if not _NAME.match(name):
        raise DefinitionError(
            field_name,
            f"{name!r} must be 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit",
        )


def duration_proto(d: timedelta | None) -> duration_pb2.Duration | None:
    """A protobuf Duration (``None`` stays unset)."""
    if d is None:
        return None
    out = duration_pb2.Duration()
    out.FromTimedelta(d)
    return out
