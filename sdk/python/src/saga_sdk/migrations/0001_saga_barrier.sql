-- The idempotency barrier of saga-sdk: one row per (saga, step, phase) that
-- took effect in this service's database, written in the same transaction as
-- the handler's own work.
--   action row 'done'      the action ran; output holds its result (JSON)
--   action row 'skipped'   a compensation arrived first: the action may
--                          never run (no hanging)
--   compensation row       the compensation ran (or was a null compensation)
CREATE TABLE IF NOT EXISTS saga_barrier (
    saga_id     text        NOT NULL,
    step        text        NOT NULL,
    phase       text        NOT NULL,
    state       text        NOT NULL,
    output      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, phase),
    CONSTRAINT saga_barrier_phase_valid CHECK (phase IN ('action', 'compensation')),
    CONSTRAINT saga_barrier_state_valid CHECK (state IN ('done', 'skipped'))
);
