-- Audit: which principal started a saga, registered a definition, and
-- registered or withdrew a participant instance (NULL when no
-- authentication was configured). Operator actions record theirs in the
-- event's detail.
ALTER TABLE sagas ADD COLUMN started_by text;
ALTER TABLE saga_definitions ADD COLUMN registered_by text;
ALTER TABLE participant_instances ADD COLUMN registered_by text;
ALTER TABLE participant_instances ADD COLUMN withdrawn_by text;
-- saga_list for a client, which sees only the sagas it started.
CREATE INDEX sagas_started_by_list_idx ON sagas (started_by, created_at DESC, saga_id DESC)
    WHERE started_by IS NOT NULL;
