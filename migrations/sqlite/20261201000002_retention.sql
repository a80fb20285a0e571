-- Retention (as on PostgreSQL): settled sagas oldest first.
CREATE INDEX sagas_settled_updated_at_idx ON sagas (updated_at)
    WHERE state IN ('COMPLETED', 'COMPENSATED', 'RESOLVED');
