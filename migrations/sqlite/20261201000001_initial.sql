-- sagad's schema on SQLite: the single-node store of `sagad dev`. The same
-- tables as on PostgreSQL; times are microseconds since the Unix epoch (the
-- process's clock: one node, one clock), ids are text.

CREATE TABLE saga_definitions (
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL CHECK (version > 0),
    content       TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    registered_by TEXT,
    PRIMARY KEY (name, version)
) STRICT;

CREATE TABLE sagas (
    saga_id          TEXT    PRIMARY KEY,
    definition       TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN
        ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'SUSPENDED', 'RESOLVED')),
    suspended_from   TEXT,
    input            TEXT    NOT NULL,
    steps            TEXT    NOT NULL,
    error            TEXT,
    deadline_at      INTEGER,
    next_run_at      INTEGER,
    owner            TEXT,
    lease_until      INTEGER,
    lease_epoch      INTEGER NOT NULL DEFAULT 0,
    event_seq        INTEGER NOT NULL DEFAULT 0,
    current_step     INTEGER,
    current_attempts INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_by       TEXT,
    trace_context    TEXT,
    FOREIGN KEY (definition, version) REFERENCES saga_definitions (name, version),
    CHECK (state IN ('RUNNING', 'COMPENSATING') OR (next_run_at IS NULL AND owner IS NULL)),
    CHECK ((owner IS NULL) = (lease_until IS NULL))
) STRICT;

CREATE INDEX sagas_next_run_at_due_idx ON sagas (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX sagas_created_at_list_idx ON sagas (created_at DESC, saga_id DESC);
CREATE INDEX sagas_state_created_at_list_idx ON sagas (state, created_at DESC, saga_id DESC);
CREATE INDEX sagas_owner_release_idx ON sagas (owner) WHERE owner IS NOT NULL;
CREATE INDEX sagas_started_by_idx ON sagas (started_by, created_at DESC, saga_id DESC)
    WHERE started_by IS NOT NULL;

CREATE TABLE saga_events (
    saga_id  TEXT    NOT NULL REFERENCES sagas (saga_id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL CHECK (seq > 0),
    at       INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    step     TEXT,
    attempt  INTEGER NOT NULL DEFAULT 0,
    detail   TEXT    NOT NULL DEFAULT '',
    took_ms  INTEGER,
    PRIMARY KEY (saga_id, seq)
) STRICT;

CREATE INDEX saga_events_settling_at_idx ON saga_events (at)
    WHERE kind IN ('completed', 'compensated', 'suspended');

CREATE TABLE participant_instances (
    participant   TEXT    NOT NULL,
    instance_id   TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    registered_by TEXT,
    withdrawn_by  TEXT,
    PRIMARY KEY (participant, instance_id)
) STRICT;
