-- sagad's schema. Every table is keyed by saga_id (or its own natural key)
-- so the schema can be distributed by saga_id later.

CREATE TABLE saga_definitions (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    -- The resolved definition (domain::Definition as JSON).
    content     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version),
    CONSTRAINT saga_definitions_version_positive CHECK (version > 0)
);

CREATE TABLE sagas (
    saga_id          uuid        PRIMARY KEY,
    definition       text        NOT NULL,
    version          integer     NOT NULL,
    state            text        NOT NULL,
    suspended_from   text,
    -- JSON text as the caller sent it (validated before insert).
    input            text        NOT NULL,
    -- Per-step status (domain::Step as a JSON array), written whole with each
    -- decision so that a decision is one row update.
    steps            jsonb       NOT NULL,
    error            text,
    deadline_at      timestamptz,
    -- When any coordinator may claim the saga: a wake-up time while it waits
    -- out a backoff, lease_until while it is held, NULL once settled.
    next_run_at      timestamptz,
    owner            uuid,
    lease_until      timestamptz,
    -- Fencing token: incremented by every claim and operator action; every
    -- write of an owner is conditioned on the epoch it claimed.
    lease_epoch      bigint      NOT NULL DEFAULT 0,
    -- Number of events written; also an optimistic-concurrency version.
    event_seq        bigint      NOT NULL DEFAULT 0,
    -- Denormalised for listing: the step in progress and its attempts.
    current_step     integer,
    current_attempts integer     NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sagas_definition_fk FOREIGN KEY (definition, version)
        REFERENCES saga_definitions (name, version),
    CONSTRAINT sagas_state_valid CHECK (state IN
        ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'SUSPENDED', 'RESOLVED')),
    CONSTRAINT sagas_suspended_from_valid CHECK
        (suspended_from IS NULL OR (state = 'SUSPENDED' AND suspended_from IN ('RUNNING', 'COMPENSATING'))),
    CONSTRAINT sagas_settled_not_due CHECK
        (state IN ('RUNNING', 'COMPENSATING') OR (next_run_at IS NULL AND owner IS NULL)),
    CONSTRAINT sagas_lease_complete CHECK ((owner IS NULL) = (lease_until IS NULL))
);

-- lease_claim_due: due sagas in due order.
CREATE INDEX sagas_next_run_at_due_idx ON sagas (next_run_at) WHERE next_run_at IS NOT NULL;
-- saga_list without a state filter, newest first.
CREATE INDEX sagas_created_at_list_idx ON sagas (created_at DESC, saga_id DESC);
-- saga_list by state (and stuck: SUSPENDED), newest first.
CREATE INDEX sagas_state_created_at_list_idx ON sagas (state, created_at DESC, saga_id DESC);
-- lease_release_all on shutdown.
CREATE INDEX sagas_owner_release_idx ON sagas (owner) WHERE owner IS NOT NULL;

CREATE TABLE saga_events (
    saga_id  uuid        NOT NULL REFERENCES sagas (saga_id) ON DELETE CASCADE,
    seq      bigint      NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    kind     text        NOT NULL,
    step     text,
    attempt  integer     NOT NULL DEFAULT 0,
    detail   text        NOT NULL DEFAULT '',
    PRIMARY KEY (saga_id, seq),
    CONSTRAINT saga_events_seq_positive CHECK (seq > 0)
);

CREATE TABLE participant_instances (
    participant  text        NOT NULL,
    instance_id  text        NOT NULL,
    endpoint     text        NOT NULL,
    expires_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, instance_id)
);
