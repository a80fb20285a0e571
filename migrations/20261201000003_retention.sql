-- Retention: settled sagas (COMPLETED, COMPENSATED, RESOLVED) are deleted
-- some time after they settled (--retention-days), oldest first, in small
-- batches. Each saga enters this index once, when it settles.
CREATE INDEX sagas_settled_updated_at_idx ON sagas (updated_at)
    WHERE state IN ('COMPLETED', 'COMPENSATED', 'RESOLVED');
