-- A participant instance's relative share of calls, from its heartbeat
-- (HeartbeatRequest.weight; 1 when not sent).
ALTER TABLE participant_instances ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
