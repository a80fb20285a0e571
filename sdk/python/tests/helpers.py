"""Shared test helpers."""

from __future__ import annotations

from datetime import timedelta

from saga_sdk import RetryPolicy, Step

FAST = RetryPolicy(
    max_attempts=3,
    initial_backoff=timedelta(milliseconds=10),
    multiplier=2.0,
    max_backoff=timedelta(milliseconds=40),
)


def step(
    name: str,
    action: str,
    *,
    compensation: str | None = None,
    idempotent: bool = True,
    participant: str = "py",
) -> Step:
    """A step with fast retries and a 5 s timeout."""
    return Step(
        name=name,
        participant=participant,
        action=action,
        compensation=compensation,
        idempotent=idempotent,
        timeout=timedelta(seconds=5),
        retry=FAST,
        compensation_retry=FAST,
    )
