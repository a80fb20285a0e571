-- The idempotency barrier of saga-sdk: one row per (saga, step, phase) that
-- took effect in this service's database, written in the same transaction as
-- the handler's own work.
--   action row 'done'      the action ran; output holds its result (JSON)
--   action row 'refused'   the action refused (its work undone); output holds
--                          the reason, answered again to every later attempt
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
    CONSTRAINT saga_barrier_state_valid CHECK (state IN ('done', 'refused', 'skipped'))
);
-- A table made before 'refused' existed: widen its check (NOT VALID: the
-- rows it holds are valid already, and nothing is scanned).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'saga_barrier'::regclass
          AND conname = 'saga_barrier_state_valid'
          AND pg_get_constraintdef(oid) LIKE '%refused%'
    ) THEN
        ALTER TABLE saga_barrier DROP CONSTRAINT IF EXISTS saga_barrier_state_valid;
        ALTER TABLE saga_barrier ADD CONSTRAINT saga_barrier_state_valid
            CHECK (state IN ('done', 'refused', 'skipped')) NOT VALID;
    END IF;
END
$$;
