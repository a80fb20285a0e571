-- Observability: where a saga hangs in a distributed trace, how long each
-- call took (the admin page's timeline), and the settling events by time
-- (the admin page's activity chart).

-- domain::SagaTrace as JSON text ({"traceparent", "tracestate", "caller_span"});
-- NULL when the saga is in no trace.
ALTER TABLE sagas ADD COLUMN trace_context text;

-- On the entry recording a participant's answer: how long the call took.
ALTER TABLE saga_events ADD COLUMN took_ms integer;

-- saga_activity: sagas that settled (or were parked) per minute. One entry
-- per saga at most reaches this index, so it costs the hot path little.
CREATE INDEX saga_events_settling_at_idx ON saga_events (at)
    WHERE kind IN ('completed', 'compensated', 'suspended');
